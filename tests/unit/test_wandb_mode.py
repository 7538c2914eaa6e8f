"""plm-train's wandb mode: the environment's WANDB_MODE overrides logger.wandb_mode, with a note."""

from plm.train.run import wandb_mode


def test_environment_overrides_the_config_with_a_note(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("online") == "online" and capsys.readouterr().out == ""
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("online") == "offline"
    assert "WANDB_MODE=offline in the environment overrides logger.wandb_mode=online" in capsys.readouterr().out
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("offline") == "disabled"
    # "dryrun" (wandb's old name, which Lightning's offline mode writes) is offline: no note
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    capsys.readouterr()
    assert wandb_mode("offline") == "offline" and capsys.readouterr().out == ""


def test_the_note_is_printed_by_rank_zero_only(monkeypatch, capsys):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning reads from RANK in a DDP worker
    assert wandb_mode("online") == "offline" and capsys.readouterr().out == ""
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert wandb_mode("online") == "offline" and "overrides" in capsys.readouterr().out
