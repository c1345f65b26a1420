"""Seeded training draws: the random choices of a training step (mask positions, crops, condition drops) as a pure
function of ``(seed, step, stream)``, so a resumed run draws what the uninterrupted one drew.

``stream`` separates the rows of one optimizer step that are drawn apart: each rank and each accumulated micro-batch
(:func:`training_stream`). Draws that must agree across ranks (MAGVIT's one mask ratio per step, VideoPoet's task
group of a step) use stream 0 on every rank. Stream 0 is the key ``seed·1_000_003 + step``; the others mix
``(that key, stream)`` through numpy's ``SeedSequence``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["step_generator", "training_stream"]


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for the draws of training ``step`` in ``stream`` (0: shared by every rank)."""
    key = int(seed) * 1_000_003 + int(step)
    if stream:
        key = int(np.random.SeedSequence([key & 0xFFFFFFFFFFFFFFFF, int(stream)]).generate_state(2, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(key)


def training_stream(module, batch_idx: int) -> int:
    """The draw stream of this ``training_step`` call: ``rank · accumulation + micro-batch``, so ranks and the
    micro-batches of one accumulated step draw independently (0 in a single process without accumulation, and
    outside a Trainer)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return 0
    accum = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    return int(trainer.global_rank) * accum + int(batch_idx) % accum
