"""`run_pipeline(cfg)`: raw tables -> prepared sequences -> pre-trained model -> embeddings -> report.

    OUT/prepared/     plm-prep   (manifest.json, tokenizer.json, train/ val/ test/, quarantine/)
    OUT/train/        plm-train  (config.yaml, checkpoints/, final.pt, csv/metrics.csv, curves.png)
    OUT/embeddings/   plm-export (part-*.parquet, _export.json)
    OUT/report/       plm-eval   (report.md, report.json, PNGs), when RAW/labels.parquet (or eval.labels) exists;
                                 a decoder preset adds its next-event metrics to the report
    OUT/pipeline.json what each stage consumed and produced, with timings

Each stage is the same function its CLI calls, with the same config: the pipeline only fills in
the folders. Pre-training composes `conf/train.yaml` with `experiment=<preset>` plus
`train_overrides` (hydra syntax), exactly like `plm-train`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from plm.config import PrepConfig
from plm.eval.config import EvalConfig
from plm.export.config import ExportConfig

STAGES = ("prep", "train", "export", "eval")


@dataclass
class PipelineConfig:
    """`plm-pipeline raw=DIR out=DIR [preset=cpu-small] [train_overrides=[...]] [prep.*=] [export.*=] [eval.*=]`."""

    raw: str = MISSING  # raw folder per spec/raw-events.md (labels.parquet optional)
    out: str = MISSING  # output folder (stages write sub-folders, see the module docstring)
    overwrite: bool = False  # replace an existing OUT
    preset: str = "cpu-small"  # conf/experiment/<preset>.yaml: model size, objective, steps
    train_overrides: list[str] = field(default_factory=list)  # extra plm-train overrides; on the command line each is quoted: "train_overrides=['trainer.max_steps=50']"
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # run these (in order); others must exist
    prep: PrepConfig = field(default_factory=PrepConfig)  # raw/out are filled in (${raw}, ${out}/prepared)
    export: ExportConfig = field(default_factory=ExportConfig)  # ckpt/data/out filled in
    eval: EvalConfig = field(default_factory=EvalConfig)  # embeddings/raw/out filled in; labels: default RAW/labels.parquet


ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def compose_train(prepared: str, run_dir: str, preset: str, overrides: list[str]):
    """The `plm-train` config for this pipeline (hydra compose API, same conf/ folder)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from plm.cli.app import conf_dir, unknown_keys, unknown_keys_message

    over = [f"data.path={prepared}", f"run_dir={run_dir}", f"experiment={preset}", *overrides]
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():  # inside the plm-pipeline hydra app
            cfg = compose("train", overrides=over)
        else:
            with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
                cfg = compose("train", overrides=over)
        extra = unknown_keys(cfg)
        t = None if extra else OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:  # whole message: hydra lists the options
        raise ValueError(f"preset={preset} train_overrides={list(overrides)}: {str(e).strip() or type(e).__name__}") from e
    if extra:
        raise ValueError(f"train_overrides={list(overrides)}: {unknown_keys_message(extra, 'plm-train')}")
    if not t.name:
        t.name = ",".join([preset, *overrides])[:128]
    return t


def torch_load_arch(path: Path) -> str | None:
    """`arch` of a plm-train final.pt ("encoder" / "decoder"), None when absent."""
    if not path.exists():
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=True).get("arch")


def check_filled_keys(cfg: PipelineConfig, raw: Path, paths: dict[str, Path]) -> None:
    """The stage keys the pipeline fills in itself (where each stage reads and writes): a
    ValueError naming any that is set to something else, instead of ignoring it."""
    fixed = {
        "prep.raw": raw, "prep.out": paths["prepared"],
        "export.ckpt": paths["train"] / "final.pt", "export.data": paths["prepared"], "export.out": paths["embeddings"],
        "eval.embeddings": paths["embeddings"], "eval.out": paths["report"], "eval.raw": raw,
        "eval.ckpt": paths["train"] / "final.pt", "eval.data": paths["prepared"],
    }
    bad = []
    for key, want in fixed.items():
        group, name = key.split(".")
        got = getattr(getattr(cfg, group), name)
        if got not in (None, "", "???") and Path(str(got)).resolve() != want.resolve():
            bad.append(f"{key}={got}")
    if bad:
        raise ValueError(f"{', '.join(bad)}: plm-pipeline sets these itself (from raw= and out=: OUT/prepared, "
                         "OUT/train, OUT/embeddings, OUT/report); drop them, or run the stage's own CLI")


def check_stage_inputs(stages: list[str], paths: dict[str, Path]) -> None:
    """Each stage reads the one before it: the stages run must be consecutive (a skipped one would
    leave the next with a missing or stale input, e.g. embeddings of an earlier model), and the
    output of the stage just before the first one run must be in OUT already."""
    idx = [STAGES.index(s) for s in stages]
    skipped = [s for s in STAGES[idx[0]:idx[-1] + 1] if s not in stages]
    if skipped:
        raise ValueError(f"stages={stages} skips {skipped}: each stage reads the output of the one before it, which "
                         f"would be missing or left from an earlier run; name {skipped} too, or run the stages' own CLIs")
    if idx[0] == 0:
        return
    before = STAGES[idx[0] - 1]
    need = {"prep": paths["prepared"] / "manifest.json", "train": paths["train"] / "final.pt",
            "export": paths["embeddings"] / "_export.json"}[before]
    if not need.exists():
        raise FileNotFoundError(f"stages={stages} starts after {before}, but {need} does not exist: add {before} (and "
                                "what it needs) to stages, or point out= at an earlier plm-pipeline run")


def run_pipeline(cfg: PipelineConfig) -> dict:
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ValueError(f"stages has unknown names {bad}; known: {list(STAGES)}")
    if not cfg.stages or list(cfg.stages) != [s for s in STAGES if s in cfg.stages]:  # also catches repeats
        raise ValueError(f"stages={list(cfg.stages)}: name one or more of {list(STAGES)}, once each, in that order")
    raw, out = Path(cfg.raw), Path(cfg.out)
    if not raw.is_dir():
        raise FileNotFoundError(f"raw folder {raw} does not exist")
    paths = {"prepared": out / "prepared", "train": out / "train", "embeddings": out / "embeddings",
             "report": out / "report"}
    check_filled_keys(cfg, raw, paths)
    labels = Path(cfg.eval.labels) if cfg.eval.labels else raw / "labels.parquet"
    if cfg.eval.labels and "eval" in cfg.stages and not labels.exists():
        raise FileNotFoundError(f"eval.labels={cfg.eval.labels} does not exist")
    if "eval" in cfg.stages and labels.exists():  # a bad label file fails now, not after prep and training
        from plm.eval.run import read_labels

        read_labels(str(labels), cfg.eval.tasks)
    check_stage_inputs(list(cfg.stages), paths)
    # the training config is composed before anything is touched: a misspelt preset or override
    # fails at once, not after the Spark job (and not after overwrite=true emptied `out`)
    tcfg = (compose_train(str(paths["prepared"]), str(paths["train"]), cfg.preset, list(cfg.train_overrides))
            if "train" in cfg.stages else None)
    if "prep" in cfg.stages:  # prep's settings and tokenizer are checked before overwrite=true may empty OUT
        from dataclasses import replace

        from data_prep.prep import check_config as check_prep
        from data_prep.prep import load_tokenizer

        check_prep(replace(cfg.prep, raw=str(raw), out=str(paths["prepared"])))
        if cfg.prep.tokenizer:
            load_tokenizer(cfg.prep.tokenizer)
            if Path(cfg.prep.tokenizer).resolve().is_relative_to(out.resolve()) and cfg.overwrite:
                raise ValueError(f"prep.tokenizer={cfg.prep.tokenizer} lies inside out={out}, which overwrite=true "
                                 "empties first: copy it elsewhere")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} is a file, not a folder")
    if out.exists() and cfg.stages[0] == "prep" and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=true to replace it")
        ours = {p.name for p in paths.values()} | {"pipeline.json"}
        other = sorted(c.name for c in out.iterdir()
                       if c.name not in ours and not c.name.endswith(".__staging__") and not c.name.startswith("."))
        if other:  # overwrite=true replaces an earlier pipeline run only, never other data
            raise FileExistsError(f"out={out} holds other data ({', '.join(other[:5])}); overwrite=true replaces "
                                  "only the outputs of an earlier plm-pipeline run: pick another out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"raw": str(raw.resolve()), "out": str(out.resolve()), "preset": cfg.preset,
                    "train_overrides": list(cfg.train_overrides), "stages_run": list(cfg.stages), "stages": {}}
    earlier = out / "pipeline.json"
    if cfg.stages[0] != "prep" and earlier.exists():
        # a partial rerun keeps the records of the stages it does not run (marked as earlier)
        try:
            prev = json.loads(earlier.read_text())
        except (OSError, ValueError):
            prev = {}
        prev = prev if isinstance(prev, dict) else {}
        old = prev.get("stages") if isinstance(prev.get("stages"), dict) else {}
        record["stages"] = {k: {**v, "earlier_run": True} for k, v in old.items()
                            if k in STAGES and k not in cfg.stages and isinstance(v, dict)}
        if "train" not in cfg.stages:  # the model in OUT is the earlier run's: record its recipe
            for k in ("preset", "train_overrides"):
                if k in prev:
                    record[k] = prev[k]

    def stage(name: str, fn) -> None:
        if name not in cfg.stages:
            return
        print(f"[plm-pipeline] {name} ...", flush=True)
        t0 = time.perf_counter()
        info = fn()
        secs = round(time.perf_counter() - t0, 1)
        record["stages"][name] = {"seconds": secs, **info}
        record["stages"] = {k: record["stages"][k] for k in STAGES if k in record["stages"]}
        print(f"[plm-pipeline] {name} done in {secs:.0f} s", flush=True)
        (out / "pipeline.json").write_text(json.dumps(record, indent=2, default=str))

    def prep() -> dict:
        from dataclasses import replace

        from data_prep.prep import run_prep

        m = run_prep(replace(cfg.prep, raw=str(raw), out=str(paths["prepared"]), overwrite=True))
        return {"out": str(paths["prepared"]), "cutoff": m["cutoff"],
                "users": {s: v.get("users", 0) for s, v in m["splits"].items()}}

    def train() -> dict:
        from plm.train.run import train as run_train

        splits = json.loads((paths["prepared"] / "manifest.json").read_text())["splits"]
        if tcfg.trainer.limit_val_batches != 0 and not splits.get("val", {}).get("windows"):
            n = sum(v.get("users", 0) for v in splits.values())
            raise ValueError(f"prep put none of the {n:,} users in the val split: train without validation with "
                             "\"train_overrides=['trainer.limit_val_batches=0']\", or give val users (more users, "
                             "or a larger prep.val_fraction)")
        if paths["train"].exists() and not tcfg.ckpt_path:  # a new model: the earlier run's folder goes
            shutil.rmtree(paths["train"])
        res = run_train(tcfg)
        return {"out": str(paths["train"]), "final": res["final"], "global_step": res["global_step"],
                "metrics": {k: v for k, v in res["metrics"].items() if k.startswith(("val/", "train/loss"))}}

    def export() -> dict:
        from dataclasses import replace

        from plm.export.run import run_export

        ecfg = replace(cfg.export, ckpt=str(paths["train"] / "final.pt"), data=str(paths["prepared"]),
                       out=str(paths["embeddings"]), overwrite=True)
        rec = run_export(ecfg)
        return {"out": str(paths["embeddings"]), "users": rec["outputs"]["users"], "throughput": rec["throughput"]}

    def evaluate() -> dict:
        from dataclasses import replace

        from plm.eval.run import run_eval

        if not labels.exists():
            print(f"[plm-pipeline] eval skipped: {labels} does not exist (no labels to evaluate)", flush=True)
            return {"skipped": f"{labels} does not exist"}
        ecfg = replace(cfg.eval, embeddings=str(paths["embeddings"]), labels=str(labels), raw=str(raw),
                       out=str(paths["report"]), overwrite=True, ckpt=None, data=None)  # decoder sections: below
        # the baseline reads the raw rows plm-prep kept: its time window, unless eval's is set
        window = json.loads((paths["prepared"] / "manifest.json").read_text()).get("ts_window", {})
        default = EvalConfig()
        if cfg.eval.ts_min == default.ts_min and window.get("min"):
            ecfg = replace(ecfg, ts_min=window["min"])
        if cfg.eval.ts_max == default.ts_max and window.get("max"):
            ecfg = replace(ecfg, ts_max=window["max"])
        extra = None
        final = paths["train"] / "final.pt"
        if torch_load_arch(final) == "decoder":  # a decoder preset: its next-event metrics join the report
            from plm.eval.next_event import decoder_sections

            e = cfg.eval
            extra = decoder_sections(str(final), str(paths["prepared"]), e.next_split, e.next_max_batches,
                                     e.generate_users, e.generate_horizon, e.seed)
        run_eval(ecfg, extra_sections=extra)
        return {"out": str(paths["report"]), "report": str(paths["report"] / "report.md")}

    t_all = time.perf_counter()
    stage("prep", prep)
    stage("train", train)
    stage("export", export)
    stage("eval", evaluate)
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    record["config"] = asdict(cfg)
    (out / "pipeline.json").write_text(json.dumps(record, indent=2, default=str))
    return record
