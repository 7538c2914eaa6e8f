"""Shared plumbing for PLM's hydra console scripts.

Every CLI is a thin `@hydra_app("name")` function: hydra composes `conf/<name>.yaml` (whose
defaults list starts with the typed dataclass schema registered in `plm.config`), so an unknown
key or a value of the wrong type fails at once with a message that names it. The function
receives the validated dataclass instance, not a DictConfig.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def conf_dir() -> str:
    """The `conf/` folder: $PLM_CONF_DIR, else the repository's top-level `conf/`."""
    env = os.environ.get("PLM_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "prep.yaml").exists():
        raise SystemExit(
            f"plm: cannot find the hydra config folder at {path} (expected conf/prep.yaml). "
            "Install PLM from a clone with `pip install -e .` or set PLM_CONF_DIR."
        )
    return str(path)


def hydra_app(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Decorate `fn(cfg_dataclass)` into a hydra console-script entry point."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[], Any]:
        import hydra

        import plm.config  # noqa: F401  (registers the schemas with hydra's ConfigStore)

        @functools.wraps(fn)
        def task(cfg):
            from omegaconf.errors import MissingMandatoryValue

            try:
                obj = OmegaConf.to_object(cfg)
            except MissingMandatoryValue as e:  # a required key (`???` in conf/) left unset
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                keys = sorted(OmegaConf.missing_keys(cfg)) or [getattr(e, "full_key", None) or "a required key"]
                need = " ".join(f"{k}=..." for k in keys)
                print(f"plm-{config_name}: error: {need} {'is' if len(keys) == 1 else 'are'} required "
                      f"(`plm-{config_name} --help` shows the config)", file=sys.stderr)
                sys.exit(2)
            # matplotlib logs "generated new fontManager" at INFO the first time it runs on a
            # machine (every fresh clone's demo; Lightning imports it), which hydra's root
            # handler printed
            logging.getLogger("matplotlib").setLevel(logging.WARNING)
            _one_lightning_log(config_name)
            return fn(obj)

        return hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)(task)

    return deco


def _one_lightning_log(config_name: str) -> None:
    """Lightning adds its own stderr handler ("INFO: ...") to the `lightning` logger when it is
    imported, and its records also reach hydra's root handler (stdout): every line was printed
    twice. Import it now and drop that handler, so each line is printed once, on stdout with the
    rest of the run's output. Only the tools that run Lightning pay for importing it (~4 s)."""
    if config_name not in ("train", "export", "pipeline") or not logging.getLogger().handlers:
        return
    import lightning  # noqa: F401  (adds the handler)

    lg = logging.getLogger("lightning")
    for h in list(lg.handlers):
        if type(h) is logging.StreamHandler:
            lg.removeHandler(h)
    # and its advertisements for optional cloud packages (litlogger, litmodels) on every run:
    # filtered where they are printed (a logger's own filter misses its children's records)
    for h in logging.getLogger().handlers:
        h.addFilter(_NoTips())
    # Lightning 2.6's pytree helper uses a form torch 2.13 deprecated: a warning about
    # Lightning's code on every run, which its users cannot act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _NoTips:
    """Drops Lightning's "💡 Tip: ... try installing ..." records; every other record passes."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Bad input or config (ValueError, ContractError among them; a missing or existing path; a
    Spark master that does not answer, ConnectionError) ends the CLI in one line naming it, exit
    code 2; `HYDRA_FULL_ERROR=1` keeps the stack trace."""
    try:
        yield
    except (FileExistsError, FileNotFoundError, ValueError, ConnectionError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {e}\n(set HYDRA_FULL_ERROR=1 for the stack trace)", file=sys.stderr)
        sys.exit(2)
