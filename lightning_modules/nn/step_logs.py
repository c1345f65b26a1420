"""Per-step training scalars at the loggers' cadence: the one way every model's ``training_step`` logs.

Lightning's ``self.log`` costs ~0.7 ms of host time per call whatever the device: each call moves the stored
metric's whole state to the value's device (``_ResultCollection.log`` -> ``_ResultMetric.to``). A loss breakdown is
3-8 calls per step (the demo's 2D tokenizer: 4.5 of its ~145 ms, ``benchmarks/step_overhead.py``), while the loggers
write step values only every ``trainer.log_every_n_steps`` batches. :func:`log_step` therefore hands the breakdown to
``self.log`` on the batches whose values reach the loggers (with the latest value of each key skipped since) and on
the batch that first reports a key (so ``trainer.callback_metrics`` lists every key from the start); the progress-bar
keys (the loss) go every step, as before. The loggers receive what per-step ``self.log`` gave them; between written
batches ``callback_metrics`` holds the breakdown of the last written one.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

from torch import Tensor

__all__ = ["log_step", "logs_due"]

# trainer -> {id(module): {"seen": keys it has been given, "pending": the latest skipped value of each key, "epoch"}}
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def logs_due(pl_module) -> bool:
    """Whether Lightning writes this training batch's step metrics to the loggers (true outside a Trainer)."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        return True
    if getattr(trainer, "fast_dev_run", False):
        return True
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except Exception:  # another Lightning layout: log every step, as self.log alone would
        return True


def log_step(pl_module, metrics: Mapping[str, Tensor | float], batch_size: int,
             prog_bar: Iterable[str] = ("train/loss",)) -> None:
    """``pl_module.log`` each of ``metrics`` for this training step: the ``prog_bar`` keys every step (shown in the
    progress bar), a key's first report, and, when :func:`logs_due`, the rest together with the latest value of every
    key skipped since (a key reported on some steps only, e.g. a per-task loss, reaches the loggers with its latest
    value, as it would from per-step ``self.log``)."""
    bar = set(prog_bar)
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:  # nothing writes on a schedule: log everything
        for name, value in metrics.items():
            pl_module.log(name, value, prog_bar=name in bar, batch_size=batch_size)
        return
    mine = _STATE.setdefault(trainer, {}).setdefault(id(pl_module), {"seen": set(), "pending": {}, "epoch": None})
    if mine["epoch"] != trainer.current_epoch:  # Lightning drops last epoch's step values at an epoch's start
        mine["pending"].clear()
        mine["epoch"] = trainer.current_epoch
    seen, pending = mine["seen"], mine["pending"]
    due = logs_due(pl_module)
    now: dict = {}
    for name, value in metrics.items():
        if due or name in bar or name not in seen:
            now[name] = value
            pending.pop(name, None)
        else:  # detached: a loss's autograd graph must not outlive its step
            pending[name] = value.detach() if isinstance(value, Tensor) else value
    if due:
        now.update(pending)
        pending.clear()
    for name, value in now.items():
        seen.add(name)
        pl_module.log(name, value, prog_bar=name in bar, batch_size=batch_size)
