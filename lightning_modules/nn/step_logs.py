"""Per-step training scalars at the loggers' cadence: the one way every model's ``training_step`` logs.

Lightning's ``self.log`` costs ~0.7 ms of host time per call whatever the device: each call moves the stored
metric's whole state to the value's device (``_ResultCollection.log`` -> ``_ResultMetric.to``). A loss breakdown is
3-8 calls per step (the demo's 2D tokenizer: 4.5 of its ~145 ms, ``benchmarks/step_overhead.py``), while the loggers
write step values only every ``trainer.log_every_n_steps`` batches. :func:`log_step` therefore hands the breakdown to
``self.log`` on the batches whose values reach the loggers, and on the batch that first reports a key (so
``trainer.callback_metrics`` lists every key from the start); the progress-bar keys (the loss) go every step, as
before. What the loggers receive is unchanged: the value of the batch they write.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

from torch import Tensor

__all__ = ["log_step", "logs_due"]

_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # trainer -> {(id(module), key)} it has been given


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
    progress bar), the others when :func:`logs_due` or when the key is new to this trainer."""
    bar = set(prog_bar)
    trainer = getattr(pl_module, "_trainer", None)
    seen = _SEEN.setdefault(trainer, set()) if trainer is not None else set()
    due = None
    for name, value in metrics.items():
        key = (id(pl_module), name)
        if name not in bar and key in seen:
            if due is None:
                due = logs_due(pl_module)
            if not due:
                continue
        seen.add(key)
        pl_module.log(name, value, prog_bar=name in bar, batch_size=batch_size)
