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
