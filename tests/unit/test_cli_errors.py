"""`plm.cli.app.cli_errors`: the one place every console script turns bad input into one line."""

import pytest

from plm.cli.app import cli_errors
from plm.data.schema import ContractError


@pytest.mark.parametrize("exc", [ValueError("stride=0 must be >= 1"), ContractError("stride=0 must be >= 1"),
                                 FileNotFoundError("stride=0 must be >= 1")])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, exc):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as e, cli_errors("plm-x"):
        raise exc
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("plm-x: error: stride=0 must be >= 1") and "HYDRA_FULL_ERROR=1" in err


def test_full_error_and_other_exceptions_pass_through(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="kept"), cli_errors("plm-x"):
        raise ValueError("kept")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(RuntimeError), cli_errors("plm-x"):  # a bug is not bad input: full trace
        raise RuntimeError("bug")


def test_export_refuses_training_keys_of_the_trainer_group():
    from plm.export.config import check_trainer_overrides

    check_trainer_overrides(["ckpt=x", "trainer=ddp", "trainer.compile=true", "trainer.num_threads=2",
                             "+trainer.precision=32-true"])
    with pytest.raises(ValueError, match=r"^trainer.max_steps, trainer.logger.x: plm-export reads only"):
        check_trainer_overrides(["trainer.max_steps=5", "trainer.compile=true", "+trainer.logger.x=1"])
