"""What every ``vidgen fit`` logs by default (#11 §7): the learning rate, throughput and samples.

A recipe that configures a callback of the same type keeps its own (with its settings); the others are added here,
so a stacked config that replaces ``trainer.callbacks`` still logs all three.
"""

from __future__ import annotations

__all__ = ["default_callbacks"]


def default_callbacks(existing: list, every_n_steps: int, max_steps: int | None, has_logger: bool) -> list:
    """The default callbacks missing from ``existing``: ``LearningRateMonitor`` (per step; needs a logger),
    ``VideoThroughputMonitor``, ``VideoSampleLogger`` (every ``every_n_steps``, at most ``max_steps``) and
    ``PredictionWriter`` (used by ``vidgen predict`` on the same config)."""
    from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor
    from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor

    from vidgen.callbacks.prediction_writer import PredictionWriter
    from vidgen.callbacks.samples import VideoSampleLogger
    from vidgen.callbacks.throughput import VideoThroughputMonitor

    def has(kind) -> bool:
        return any(isinstance(c, kind) for c in existing)

    out = []
    if has_logger and not has(LearningRateMonitor):
        out.append(LearningRateMonitor(logging_interval="step"))
    if not has(LightningThroughputMonitor):
        out.append(VideoThroughputMonitor())
    if not has(VideoSampleLogger):
        every = int(every_n_steps)
        if max_steps and max_steps > 0:
            every = max(1, min(every, int(max_steps)))
        out.append(VideoSampleLogger(every_n_steps=every))
    if not has(BasePredictionWriter):
        out.append(PredictionWriter())
    return out
