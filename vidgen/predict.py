"""``vidgen predict``: what to generate from, and where it goes.

Input, in this order:

* ``--data.predict_shards`` (shards, a folder, or one video file): the model conditions on those clips (frame
  prediction, reconstruction, ...) and/or their labels/captions;
* otherwise conditioning made here: ``--num_samples N`` clips per class (``--classes '[0, 3, 7]'``; a
  class-conditional model without ``--classes`` samples every class), per prompt
  (``--prompts '["a red square moving left", "a blue circle moving up"]'``), or N unconditional clips. Both options are
  lists, written as one argument in jsonargparse's (YAML) list form.

A model says what it samples from with ``prediction_inputs() -> {"kind": "class"|"text"|"video"|"none",
"num_classes": K}`` (absent: "none").  Missing input is exit status 2 with one line naming it; a predict run that
wrote nothing is an error too.  Files are written by ``vidgen.callbacks.prediction_writer.PredictionWriter`` (added
when the recipe has no ``BasePredictionWriter``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["add_predict_arguments", "conditioning_items", "run_predict", "PredictInputError"]

KINDS = ("class", "text", "video", "none")


class PredictInputError(ValueError):
    """What ``vidgen predict`` would generate from is missing or contradictory."""


def add_predict_arguments(parser) -> None:
    parser.add_argument("--num_samples", type=int | None, default=None,
                        help="without --data.predict_shards: clips per class / per prompt (or in all, unconditional)")
    parser.add_argument("--classes", type=list[int] | None, default=None,
                        help="class ids to sample (class-conditional models; default: every class)")
    parser.add_argument("--prompts", type=list[str] | None, default=None, help="captions to sample (text-conditional models)")
    parser.add_argument("--task", type=str | None, default=None,
                        help="the task to predict, for models with several (VideoPoet: t2v, i2v, fp, v2a, a2v, ...)")


def model_inputs(model) -> dict:
    fn = getattr(model, "prediction_inputs", None)
    info = dict(fn()) if callable(fn) else {"kind": "none"}
    if info.get("kind") not in KINDS:
        raise TypeError(f"{type(model).__name__}.prediction_inputs() kind must be one of {KINDS}, got {info!r}")
    return info


def conditioning_items(info: dict, num_samples: int | None, classes: list[int] | None,
                       prompts: list[str] | None, model_name: str = "the model") -> list[dict]:
    """Per-sample conditioning dicts (``key`` + ``label`` or ``text``) for a model that needs no input clips."""
    kind = info["kind"]
    given = [f for f, v in (("--num_samples", num_samples), ("--classes", classes), ("--prompts", prompts)) if v]
    if kind == "video":
        raise PredictInputError(f"{model_name} generates from input clips: give --data.predict_shards "
                                "<shard dir | video file>")
    if not given:
        what = {"class": "--num_samples N (N clips per class; --classes '[0, 3]' to pick classes)",
                "text": "--prompts '[\"caption\", ...]' (--num_samples N clips per prompt)",
                "none": "--num_samples N"}[kind]
        raise PredictInputError(f"no input to predict from: give {what}, or --data.predict_shards")
    if num_samples is not None and num_samples < 1:
        raise PredictInputError(f"--num_samples must be >= 1, got {num_samples}")
    n = num_samples or 1
    if classes and kind != "class":
        raise PredictInputError(f"--classes given, but {model_name} is not class-conditional (it conditions on {kind})")
    if prompts and kind != "text":
        raise PredictInputError(f"--prompts given, but {model_name} is not text-conditional (it conditions on {kind})")
    if kind == "text":
        if not prompts:
            raise PredictInputError(f"{model_name} is text-conditional: give --prompts '[\"caption\", ...]'")
        return [{"key": f"prompt{j:03d}_{i:03d}", "text": p} for j, p in enumerate(prompts) for i in range(n)]
    if kind == "class":
        k = int(info.get("num_classes") or 0)
        ids = list(classes) if classes else list(range(k))
        bad = [c for c in ids if not 0 <= int(c) < k]
        if bad:
            raise PredictInputError(f"--classes {bad} outside [0, {k}) (the model has {k} classes)")
        return [{"key": f"class{int(c):03d}_{i:03d}", "label": int(c)} for c in ids for i in range(n)]
    return [{"key": f"sample{i:04d}"} for i in range(n)]


class _Items(Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _collate(rows: list[dict]) -> dict:
    out: dict[str, Any] = {"key": [r["key"] for r in rows]}
    if "label" in rows[0]:
        out["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    if "text" in rows[0]:
        out["text"] = [r["text"] for r in rows]
    return out


def run_predict(cli, model, datamodule=None, **kwargs) -> Any:
    """``LightningCLI``'s predict: the datamodule's predict data, or conditioning from the options (module doc)."""
    from vidgen.callbacks.prediction_writer import PredictionWriter
    from lightning.pytorch.callbacks import BasePredictionWriter

    cfg = cli.config_init["predict"]
    num_samples, classes, prompts = cfg.get("num_samples"), cfg.get("classes"), cfg.get("prompts")
    if cfg.get("task"):
        if not hasattr(getattr(model, "config", None), "predict_task"):
            print(f"vidgen predict: --task given, but {type(model).__name__} has a single task", file=sys.stderr)
            sys.exit(2)
        from vidgen.lightning_modules.videopoet import LAYOUTS

        if cfg["task"] not in LAYOUTS:
            print(f"vidgen predict: --task {cfg['task']!r} is not a task; allowed: {', '.join(LAYOUTS)}",
                  file=sys.stderr)
            sys.exit(2)
        model.config.predict_task = cfg["task"]
    trainer = cli.trainer
    has_data = datamodule is not None and getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)(
        "predict_shards") is not None
    name = type(model).__name__
    try:
        if has_data:
            if num_samples or classes or prompts:
                raise PredictInputError("give either --data.predict_shards or --num_samples/--classes/--prompts, "
                                        "not both")
            loaders = {"datamodule": datamodule}
        else:
            items = conditioning_items(model_inputs(model), num_samples, classes, prompts, name)
            bs = int(getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)("batch_size") or 8)
            loaders = {"dataloaders": DataLoader(_Items(items), batch_size=bs, collate_fn=_collate)}
    except PredictInputError as e:
        print(f"vidgen predict: {e}", file=sys.stderr)
        sys.exit(2)
    writers = [c for c in trainer.callbacks if isinstance(c, BasePredictionWriter)]
    if not writers:
        writers = [PredictionWriter()]
        trainer.callbacks.append(writers[0])
    if kwargs.get("return_predictions") is None:  # the writer has them; keeping every video in memory is a trap
        kwargs["return_predictions"] = False
    out = trainer.predict(model, **loaders, **kwargs)
    written = sum(len(getattr(w, "written", ()) or ()) for w in writers if isinstance(w, PredictionWriter))
    if written == 0 and all(isinstance(w, PredictionWriter) for w in writers):
        print("vidgen predict: nothing was generated (the predict data holds no samples?)", file=sys.stderr)
        sys.exit(1)
    if trainer.is_global_zero:
        for w in writers:
            if isinstance(w, PredictionWriter):
                print(f"[vidgen] predictions: {w.out_dir(trainer)} ({len(w.written)} files)", flush=True)
    return out
