"""``ThroughputMonitor``: training speed and memory, logged as ``perf/*`` every ``log_every_n_steps`` optimizer steps.

Per window (the batches since the last log):

* ``perf/clips_per_s``: clips per second over all ranks (this rank's rate x world size; ranks run in lock-step);
* ``perf/tokens_per_s``: the same in tokens: ``pl_module.tokens_per_sample(batch)`` when the model defines it
  (an int per sample or a tensor of per-sample counts), else ``T*H*W / patch`` of ``batch["video"]`` with ``patch``
  from the model's ``patch_size`` (int p -> p*p per frame; (pt, ph, pw) -> pt*ph*pw), pixels when it has none;
* ``perf/data_wait_fraction``: time between one ``on_train_batch_end`` and the next ``on_train_batch_start`` over the
  window's wall time. That gap is the data fetch (plus batch transfer and the other callbacks' batch-end work, e.g.
  checkpointing); validation runs are excluded;
* ``perf/step_time_s``: mean wall time per batch;
* ``perf/peak_memory_gb``: ``torch.cuda.max_memory_allocated`` on GPU (since process start), else the process's
  peak RSS (``resource.getrusage(...).ru_maxrss``).

On CUDA the timer synchronizes the device at batch start/end (``synchronize=True``) so the step time is the real
compute time, not the launch time. Metrics go to every logger from global rank 0 (no collective).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["ThroughputMonitor", "tokens_in_batch"]


def _video(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, dict):
        v = batch.get("video")
        return v if isinstance(v, torch.Tensor) else None
    return batch if isinstance(batch, torch.Tensor) else None


def _clips(batch: Any) -> int:
    v = _video(batch)
    if v is not None:
        return int(v.shape[0])
    if isinstance(batch, dict):
        for x in batch.values():
            if isinstance(x, (torch.Tensor, list)) and len(x):
                return len(x)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0


def tokens_in_batch(pl_module, batch: Any) -> float:
    """Tokens in ``batch`` for ``pl_module`` (see module docstring)."""
    fn = getattr(pl_module, "tokens_per_sample", None)
    if callable(fn):
        t = fn(batch)
        if isinstance(t, torch.Tensor):
            return float(t.sum()) if t.dim() else float(t) * _clips(batch)
        return float(t) * _clips(batch)
    v = _video(batch)
    if v is None or v.dim() != 5:
        return 0.0
    b, _, t, h, w = v.shape
    p = getattr(pl_module, "patch_size", None)
    if p is None:
        p = getattr(getattr(pl_module, "hparams", {}), "get", lambda *_: None)("patch_size")
    if isinstance(p, int):
        patch = p * p
    elif isinstance(p, (list, tuple)) and p:
        patch = math.prod(int(x) for x in p)
    else:
        patch = 1
    return float(b * t * h * w) / patch


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


class ThroughputMonitor(Callback):
    """clips/s, tokens/s, data-wait fraction, step time and peak memory as ``perf/*``.

    Args:
        log_every_n_steps: optimizer steps per window (default: ``trainer.log_every_n_steps``).
        synchronize: on CUDA, synchronize at batch start/end for honest timings.
    """

    def __init__(self, log_every_n_steps: int | None = None, synchronize: bool = True):
        super().__init__()
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"ThroughputMonitor log_every_n_steps must be a positive integer or null, "
                             f"got {log_every_n_steps!r}")
        self.log_every_n_steps, self.synchronize = log_every_n_steps, synchronize
        self.last_metrics: dict[str, float] = {}
        self._reset_window()
        self._end: float | None = None
        self._start: float | None = None
        self._last_bucket: int | None = None

    def _reset_window(self):
        self._wait = self._busy = 0.0
        self._clips = self._tokens = 0.0
        self._batches = 0

    def _every(self, trainer) -> int:
        return self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))

    def _now(self, pl_module) -> float:
        if self.synchronize and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_bucket = trainer.global_step // self._every(trainer)
        self._reset_window()
        self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now(pl_module)
        if self._end is not None:
            self._wait += now - self._end
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(pl_module)
        if self._start is not None:
            self._busy += now - self._start
        self._end = now
        self._batches += 1
        self._clips += _clips(batch)
        self._tokens += tokens_in_batch(pl_module, batch)
        bucket = trainer.global_step // self._every(trainer)
        if self._last_bucket is not None and bucket <= self._last_bucket:
            return
        self._last_bucket = bucket
        total = self._wait + self._busy
        world = max(1, int(trainer.world_size))
        m = {
            "perf/clips_per_s": self._clips / total * world if total > 0 else 0.0,
            "perf/tokens_per_s": self._tokens / total * world if total > 0 else 0.0,
            "perf/data_wait_fraction": self._wait / total if total > 0 else 0.0,
            "perf/step_time_s": total / max(1, self._batches),
            "perf/peak_memory_gb": peak_memory_gb(pl_module.device),
        }
        self.last_metrics = m
        self._reset_window()
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(m, step=trainer.global_step)

    # validation between two batches is not data wait
    def on_validation_start(self, trainer, pl_module) -> None:
        self._end = None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._end = None
