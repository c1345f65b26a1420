"""Host time per training step outside the model: Lightning's ``self.log`` and the EMA update, side by side.

Times the demo's 2D tokenizer recipe (``configs/magvit/tokenizer_2d_tiny.yaml``: batch 16 of 32^2 frames, EMA, the
CLI's run layout with TensorBoard, ``log_every_n_steps`` 50) through ``Trainer.fit`` on one thread, alternating in
one process (this machine's speed drifts by +-20% over minutes, so separate runs cannot resolve a few percent):

- ``every step``: the loss breakdown (8 scalars) handed to ``self.log`` on every batch, as before ``log_step``;
- ``log_step``: ``vidgen.lightning_modules.nn.step_logs.log_step`` (the breakdown on the batches the loggers write).

and, on the same model, ``EMAShadow.update`` against the bare ``torch._foreach_lerp_`` it wraps (its floor).

    python benchmarks/step_overhead.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _fit_seconds(steps: int, every_step: bool, run_dir: str) -> tuple[float, float]:
    """(seconds per step, seconds per step inside ``self.log``) over ``steps`` steps after 5 warm-up steps."""
    import lightning as L

    from vidgen.callbacks.ema import EMA
    from vidgen.demos.common import stage_trainer
    from vidgen.lightning_modules.nn import step_logs
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    cfg = yaml.safe_load((ROOT / "configs/magvit/tokenizer_2d_tiny.yaml").read_text())
    torch.manual_seed(0)
    model = VideoTokenizer(**cfg["model"]["init_args"], num_frames=1, resolution=32)
    g = torch.Generator().manual_seed(0)
    batches = [{"video": torch.rand(16, 3, 1, 32, 32, generator=g) * 2 - 1, "label": torch.zeros(16, dtype=torch.long),
                "key": [""] * 16, "text": [""] * 16} for _ in range(8)]

    class Timer(L.Callback):
        t0 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5 and self.t0 is None:  # after the warm-up steps
                self.t0 = time.perf_counter()

    in_log = [0.0]
    log = model.log

    def timed_log(*args, **kwargs):
        t = time.perf_counter()
        try:
            return log(*args, **kwargs)
        finally:
            if timer.t0 is not None:
                in_log[0] += time.perf_counter() - t

    model.log = timed_log
    timer = Timer()
    trainer = stage_trainer(run_dir, max_steps=steps + 5, callbacks=[EMA(decay=0.9), timer])
    due = step_logs.logs_due
    if every_step:
        step_logs.logs_due = lambda pl_module: True
    try:
        loader = torch.utils.data.DataLoader(batches * ((steps + 5) // len(batches) + 1), batch_size=None)
        trainer.fit(model, train_dataloaders=loader)
    finally:
        step_logs.logs_due = due
    return (time.perf_counter() - timer.t0) / steps, in_log[0] / steps


def _ema_update_ms(n: int = 200) -> tuple[float, float]:
    from vidgen.lightning_modules.nn.ema import EMAShadow
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    cfg = yaml.safe_load((ROOT / "configs/magvit/tokenizer_2d_tiny.yaml").read_text())
    model = VideoTokenizer(**cfg["model"]["init_args"], num_frames=1, resolution=32)
    shadow = EMAShadow.from_module(model)
    params = [p.detach() for p in model.parameters()]
    buffers = [b for _, b in shadow.named_buffers()]

    def timed(f) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1000

    update = timed(lambda: shadow.update(model, 0.99))
    lerp = timed(lambda: torch._foreach_lerp_(buffers, params, 0.01))
    return update, lerp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    runs: dict[str, list[tuple[float, float]]] = {"every step": [], "log_step": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name in runs:
                runs[name].append(_fit_seconds(a.steps, name == "every step", f"{tmp}/{name.replace(' ', '_')}{r}"))
    print(f"torch {torch.__version__}, 1 thread; demo 2D tokenizer, {a.steps} timed steps x {a.repeats}, alternating")
    med = {k: statistics.median(x for x, _ in v) * 1000 for k, v in runs.items()}
    logs = {k: statistics.median(y for _, y in v) * 1000 for k, v in runs.items()}
    for k, v in runs.items():
        print(f"  {k:<11} step {med[k]:7.1f} ms (runs: {', '.join(f'{x * 1000:.1f}' for x, _ in v)}), "
              f"of which self.log {logs[k]:.2f} ms")
    print(f"  ratio of the time in self.log, every step / log_step: {logs['every step'] / logs['log_step']:.1f}; "
          f"saved per step: {logs['every step'] - logs['log_step']:.2f} ms = "
          f"{(logs['every step'] - logs['log_step']) / med['every step'] * 100:.1f}% of the step")
    upd, lerp = _ema_update_ms()
    print(f"EMAShadow.update {upd:.2f} ms vs its foreach lerp alone {lerp:.2f} ms (ratio {upd / lerp:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
