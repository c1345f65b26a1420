"""``VideoThroughputMonitor``: Lightning's ``ThroughputMonitor`` (samples/s, items/s, FLOPs/s and MFU, on the same step
axis as the training losses) for video batches, plus the data-wait fraction and peak memory.

From Lightning (``train|device/...`` every ``trainer.log_every_n_steps`` batches; ``device/`` is this rank):

* ``samples_per_sec`` = clips per second; ``items_per_sec`` = tokens per second, with the tokens of a batch from
  ``pl_module.tokens_per_sample(batch)`` when the model defines it (an int per sample or a tensor of per-sample
  counts), else ``T*H*W / patch`` of ``batch["video"]`` with ``patch`` from the model's ``patch_size`` (int p -> p*p
  per frame; (pt, ph, pw) -> pt*ph*pw), pixels when it has none;
* ``flops_per_sec`` and ``mfu``: from ``pl_module.flops_per_batch`` when the model sets it, else measured here once
  on the first training batch (forward + backward, ``torch.utils.flop_counter.FlopCounterMode``; not for FSDP2-sharded
  parameters, where the model sets ``flops_per_batch`` itself); MFU needs the
  device's peak FLOPs, which Lightning knows for common GPUs (not for CPUs).

Added here, logged at the same step:

* ``perf/data_wait_fraction``: time between one ``on_train_batch_end`` and the next ``on_train_batch_start`` over the
  window's wall time. That gap is the data fetch (plus batch transfer and the other callbacks' batch-end work, e.g.
  checkpointing); validation runs are excluded;
* ``perf/step_time_s``: mean wall time per batch;
* ``perf/peak_memory_gb``: ``torch.cuda.max_memory_allocated`` on GPU (since process start), else the process's
  peak RSS (``resource.getrusage(...).ru_maxrss``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor

__all__ = ["VideoThroughputMonitor", "tokens_in_batch", "clips_in_batch"]


def _video(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, dict):
        v = batch.get("video")
        return v if isinstance(v, torch.Tensor) else None
    return batch if isinstance(batch, torch.Tensor) else None


def clips_in_batch(batch: Any) -> int:
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
            return float(t.sum()) if t.dim() else float(t) * clips_in_batch(batch)
        return float(t) * clips_in_batch(batch)
    v = _video(batch)
    if (v is None or v.dim() != 5) and isinstance(batch, dict):  # token / latent batches: their grid is the tokens
        if isinstance(batch.get("tokens"), torch.Tensor):
            return float(batch["tokens"].numel())
        if isinstance(batch.get("latents"), torch.Tensor) and batch["latents"].dim() >= 2:
            lat = batch["latents"]
            return float(lat.numel() // lat.shape[1])
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


class VideoThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for video batches (clips, tokens, FLOPs/MFU) plus data wait and memory.

    Args:
        measure_flops: count the FLOPs of the first training batch when the model has no ``flops_per_batch``.
        window_size: batches over which Lightning averages the rates.
    """

    def __init__(self, measure_flops: bool = True, window_size: int = 20):
        super().__init__(batch_size_fn=clips_in_batch, length_fn=self._tokens, window_size=window_size)
        self.measure_flops = measure_flops
        self.last_metrics: dict[str, float] = {}
        self._module = None
        self._counter = None
        self._wait = self._busy = 0.0
        self._nbatch = 0
        self._t_end: float | None = None
        self._t_start: float | None = None

    def _tokens(self, batch: Any) -> int:
        return max(int(round(tokens_in_batch(self._module, batch))), clips_in_batch(batch))

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._module = pl_module
        self._t_end = None
        super().on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now(pl_module)
        if self._t_end is not None:
            self._wait += now - self._t_end
        self._t_start = now
        if self.measure_flops and self._counter is None and not hasattr(pl_module, "flops_per_batch"):
            from torch.utils.flop_counter import FlopCounterMode

            if any(type(p).__name__ == "DTensor" for p in pl_module.parameters()):
                self.measure_flops = False  # sharded (FSDP2) parameters: set pl_module.flops_per_batch for MFU
                return

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None and not hasattr(pl_module, "flops_per_batch"):
            self._counter.__exit__(None, None, None)
            # FLOPs of this rank's batch (forward + backward + optimizer); Lightning scales by the world size
            pl_module.flops_per_batch = int(self._counter.get_total_flops())
            self._counter = None  # exited: on_exception must not exit it a second time (that hid the user's error)
        now = self._now(pl_module)
        if self._t_start is not None:
            self._busy += now - self._t_start
        self._t_end = now
        self._nbatch += 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.is_global_zero and trainer._logger_connector.should_update_logs:
            total = self._wait + self._busy
            m = {"perf/data_wait_fraction": self._wait / total if total > 0 else 0.0,
                 "perf/step_time_s": total / max(1, self._nbatch),
                 "perf/peak_memory_gb": peak_memory_gb(pl_module.device)}
            trainer._logger_connector.log_metrics(m)  # step: the training-loss axis (batches that stepped)
            self.last_metrics = {**{k: float(v) for k, v in trainer._logger_connector._logged_metrics.items()
                                    if k.startswith(("train/", "perf/"))}, **m}
            self._wait = self._busy = 0.0
            self._nbatch = 0

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    # validation between two batches is not data wait
    def on_validation_start(self, trainer, pl_module) -> None:
        self._t_end = None
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t_end = None
        super().on_validation_end(trainer, pl_module)
