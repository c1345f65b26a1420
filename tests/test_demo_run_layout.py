"""Issue 11 §3: the demo's stages train in the CLI's run layout (``<run>/checkpoints/last.ckpt``, TensorBoard in
``<run>/tb/``), never in ``lightning_logs/version_N``."""

import re
from pathlib import Path

import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from vidgen.demos.common import last_checkpoint, stage_trainer

DEMOS = Path(__file__).resolve().parents[1] / "vidgen" / "demos"


def test_stage_trainer_writes_the_cli_run_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out" / "stage"
    trainer = stage_trainer(run, max_steps=3, limit_val_batches=0)
    trainer.fit(BoringModel())
    ckpt = Path(last_checkpoint(run))
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["global_step"] == 3
    assert (run / "tb").is_dir()
    assert not list(tmp_path.rglob("lightning_logs")), "a stage wrote lightning_logs/"


def test_no_demo_stage_builds_its_own_trainer():
    """Every stage goes through stage_trainer (one place that owns the layout)."""
    for f in DEMOS.glob("*.py"):
        if f.name == "common.py":
            continue
        assert not re.search(r"\bL\.Trainer\(|\bTrainer\(", f.read_text()), f"{f.name} builds a Trainer itself"
