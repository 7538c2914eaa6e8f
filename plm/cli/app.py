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

            extra = unknown_keys(cfg)
            if extra:
                msg = unknown_keys_message(extra, f"plm-{config_name}")
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise ValueError(msg)
                print(f"plm-{config_name}: error: {msg}", file=sys.stderr)
                sys.exit(2)
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
            started.append(True)
            return fn(obj)

        started: list[bool] = []
        run = hydra.main(version_base="1.3", config_path=conf_dir(), config_name=config_name)(task)

        @functools.wraps(fn)
        def entry() -> Any:
            # hydra reports an override it cannot apply (an unknown key, a value of the wrong
            # type, a missing config group option) and exits with 1, before `task` runs; that
            # is bad input like any other, so it exits with 2 as ours do, and 1 stays for
            # crashes (an error hydra caught while the task ran)
            bare = unquoted_brackets(sys.argv[1:])
            if bare and os.environ.get("HYDRA_FULL_ERROR") != "1":
                key, value = bare.split("=", 1)
                print(f"plm-{config_name}: error: {bare}: hydra reads brackets in a value as a list; quote "
                      f"the value: \"{key}='{value}'\"", file=sys.stderr)
                sys.exit(2)
            try:
                return run()
            except SystemExit as e:
                if e.code == 1 and not started:
                    sys.exit(2)
                raise

        return entry

    return deco


def unquoted_brackets(args: list[str]) -> str | None:
    """The first `key=value` override whose value holds a bracket after plain text, such as
    `spark.master=local[2]`: hydra's grammar fails on it with "mismatched input '['", which does
    not name the override. Lists (`[...]`), dicts, quoted values and sweeps (`choice(...)`) pass."""
    import re

    for a in args:
        if "=" in a and not a.startswith("-") and re.match(r"[^'\"\[\]{}()]+[\[\]]", a.split("=", 1)[1]):
            return a
    return None


def unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys of `cfg` that its typed schema does not have. Hydra's `+key=value` adds a key to
    a structured config, and `OmegaConf.to_object` sets it as a stray attribute of the dataclass
    that no code reads: an option accepted and silently ignored (hydra's own error for a
    misspelt key suggests that very form). Dict-typed fields (`spark.conf`) take any key."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig

    if isinstance(cfg, ListConfig):
        return [k for i in range(len(cfg)) for k in unknown_keys(cfg._get_node(i), f"{prefix}{i}.")]
    if not isinstance(cfg, DictConfig) or cfg._is_none() or cfg._is_missing():
        return []
    schema = OmegaConf.get_type(cfg)
    names = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    out = []
    for k in cfg.keys():
        if names is not None and k not in names:
            out.append(f"{prefix}{k}")
        else:
            out += unknown_keys(cfg._get_node(k), f"{prefix}{k}.")
    return out


def unknown_keys_message(extra: list[str], tool: str) -> str:
    """The error for `unknown_keys` of `tool`'s config (every tool and plm-pipeline's train_overrides)."""
    return (f"{', '.join(extra)}: not {'a key' if len(extra) == 1 else 'keys'} of {tool}'s config (a `+key=value` "
            f"override adds a key no tool reads; `{tool} --help` shows the config)")


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
