"""Recipes that chain (#11 §5): every stage-2 recipe reads what its stage-1 recipe writes, tiny chains fit together,
and one chain runs through the CLI as the README writes it (fit stage 1 -> fit stage 2 -> predict)."""

import glob
import os
import re

import pytest
import torch
import yaml

from cliutil import ROOT, run_cli

CHAIN_KEYS = ("tokenizer_path", "audio_tokenizer_path", "path")


def _recipes():
    # configs/trainer/ are trainer fragments; configs/demo/ are the demo's own stage configs (the demo passes its
    # stages' checkpoints in), not user recipes
    return sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))
                  if "/trainer/" not in p and "/demo/" not in p)


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _inputs(cfg):
    """Paths under runs/ that a recipe reads (stage-1 outputs)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in CHAIN_KEYS and isinstance(v, str) and v.startswith("runs/"):
                    found.append(v)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(cfg.get("model"))
    return found


def chains():
    """(stage-1 recipe, stage-2 recipe) for every stage-2 recipe in configs/."""
    out = []
    for p in _recipes():
        for path in _inputs(_load(p)):
            m = re.fullmatch(r"runs/([^/]+)/checkpoints/last\.ckpt", path)
            assert m, f"{p}: {path} is not runs/<stage-1 recipe>/checkpoints/last.ckpt"
            out.append((os.path.join(os.path.dirname(p), m.group(1) + ".yaml"), p))
    return out


def test_every_stage2_recipe_reads_what_its_stage1_recipe_writes():
    pairs = chains()
    assert len(pairs) >= 10
    for stage1, stage2 in pairs:
        assert os.path.isfile(stage1), f"{stage2} reads the run of {stage1}, which does not exist"
        assert not _load(stage1).get("name"), f"{stage1} sets name:, so it does not write runs/<its stem>/"
        assert stage1.endswith("_tiny.yaml") == stage2.endswith("_tiny.yaml"), (stage1, stage2)
        assert os.path.relpath(stage1, ROOT) in open(stage2).read(), f"{stage2} does not name its stage 1 in its header"
    for p in _recipes():
        if not p.endswith("_tiny.yaml"):
            assert os.path.isfile(p[:-5] + "_tiny.yaml"), f"{p} has no _tiny sibling"


def _model(cfg, extra=None):
    import importlib

    m, d = cfg["model"], cfg["data"]["init_args"]
    mod, _, name = m["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    args = dict(m.get("init_args") or {})
    for k in ("num_frames", "resolution", "frame_stride"):  # linked data -> model
        if k in d and k in cls.__init__.__code__.co_varnames:
            args[k] = d[k]
    args.update(extra or {})
    return cls(**args), d


@pytest.mark.parametrize("stage1,stage2", [c for c in chains() if c[1].endswith("_tiny.yaml")],
                         ids=lambda p: os.path.basename(p))
def test_tiny_chain_fits_together(stage1, stage2, tmp_path):
    """The stage-1 model of each tiny chain, saved as Lightning saves it, loads into its stage-2 recipe, which then
    takes a training step on demo-shaped clips (token grid, codebook and task frames agree)."""
    torch.manual_seed(0)
    cfg2 = _load(stage2)
    extra = {}
    # every stage-1 run the recipe reads (a video-to-audio LM reads a video and an audio tokenizer)
    for key in ("tokenizer_path", "audio_tokenizer_path"):
        path = (cfg2["model"].get("init_args") or {}).get(key)
        m = re.fullmatch(r"runs/([^/]+)/checkpoints/last\.ckpt", path or "")
        if m is None and key != "tokenizer_path":
            continue
        recipe = stage1 if m is None else os.path.join(os.path.dirname(stage2), m.group(1) + ".yaml")
        tok, _ = _model(_load(recipe))
        ckpt = tmp_path / f"{key}.ckpt"
        torch.save({"hyper_parameters": dict(tok.hparams), "state_dict": tok.state_dict()}, ckpt)
        extra[key] = str(ckpt)
    model, d = _model(cfg2, extra)
    b = 2
    video = torch.rand(b, 3, d["num_frames"], d["resolution"], d["resolution"]) * 2 - 1
    batch = {"video": video, "label": torch.zeros(b, dtype=torch.long), "text": [""] * b, "key": ["a", "b"]}
    audio_tok = getattr(model, "audio_tokenizer", None)
    if audio_tok is not None:  # the clip's soundtrack, as the datamodule gives it with data.audio_rate
        batch["audio"] = torch.randn(b, 1, model.config.audio_frames * audio_tok.hop) * 0.1
        batch["has_audio"] = torch.ones(b, dtype=torch.bool)
    model.configure_optimizers()
    loss = model.training_step(batch, 0)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)


@pytest.mark.timeout(1500)  # four CLI processes (about 2 minutes on a quiet 2-core machine)
def test_ucf101_chain_through_the_cli(tmp_path):
    """README: `vidgen fit tokenizer_ucf101_tiny` then `vidgen fit ucf101_cg_tiny`, then predict 1 clip of class 3
    (tiny steps).  Predict without input exits 2 naming the options."""
    from vidgen.demo_data import build_demo_data

    build_demo_data(str(tmp_path / "data" / "demo"), seed=0, fast=True)  # the recipes read data/demo/ (a fresh clone has none)
    quick = ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
             "--data.init_args.num_workers", "0"]
    run_cli(["fit", "--config", os.path.join(ROOT, "configs/magvit/tokenizer_ucf101_tiny.yaml"),
             "--trainer.max_steps", "2", *quick], cwd=tmp_path, timeout=900)
    assert (tmp_path / "runs/tokenizer_ucf101_tiny/checkpoints/last.ckpt").exists()
    stage2 = os.path.join(ROOT, "configs/magvit/ucf101_cg_tiny.yaml")
    run_cli(["fit", "--config", stage2, "--trainer.max_steps", "1", "--model.init_args.decode_steps", "2", *quick],
            cwd=tmp_path, timeout=900)
    p = run_cli(["predict", "--config", stage2, "--ckpt_path", "last", *quick[2:]], cwd=tmp_path, check=False, timeout=900)
    assert p.returncode == 2 and "--num_samples" in p.stderr, p.stderr[-2000:]
    run_cli(["predict", "--config", stage2, "--ckpt_path", "last", "--num_samples", "1", "--classes", "[3]",
             "--model.init_args.decode_steps", "2", *quick[2:]], cwd=tmp_path, timeout=900)
    found = glob.glob(str(tmp_path / "runs" / "ucf101_cg_tiny*" / "**" / "samples.npz"), recursive=True)
    assert found, list(glob.glob(str(tmp_path / "runs" / "**"), recursive=True))
    import numpy as np

    s = np.load(found[0])
    assert s["videos"].shape == (1, 8, 32, 32, 3) and s["videos"].dtype == np.uint8 and list(s["labels"]) == [3]
