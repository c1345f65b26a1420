"""Eval batches' padding rows: the one way every eval consumer drops them.

An eval batch (val/test/predict) carries ``valid`` bool ``[B]``: under DDP the shorter ranks' batches are filled with
repeats of real clips marked False, so that every rank runs the same steps (DEVELOPERS.md, ``datamodules/stream.py``).
Metrics, retrieval statistics, FVD features and written predictions must count the real rows only. Train batches
have no ``valid``; neither do batches built by hand (``vidgen predict --num_samples``): nothing is dropped then.

* :func:`valid_rows` — the mask (``None`` without one).
* :func:`keep_valid` — the batch (or a prediction dict, given the batch's mask) cut to its real rows; the very same
  object when there is nothing to drop, so a batch without padding computes exactly as before.
* :func:`eval_rows` — for a ``validation_step``: the rows to compute on and how many are real. When every row is
  padding it returns the first (padding) row with count 0: the step runs its usual computation (the same modules, so
  the same collectives, e.g. FSDP's all-gathers, on every rank) and logs with ``batch_size=0``, a zero weight in
  Lightning's epoch mean, while every rank still logs the same keys (their epoch-end sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["valid_rows", "keep_valid", "eval_rows"]


def valid_rows(batch: Mapping[str, Any] | None) -> Tensor | None:
    """``batch["valid"]`` as a CPU bool tensor ``[B]`` (True: a real clip, False: DDP padding), or ``None`` when the
    batch has none (a train batch, a hand-built one)."""
    if not isinstance(batch, Mapping):
        return None
    v = batch.get("valid")
    if v is None:
        return None
    return torch.as_tensor(v).detach().to("cpu", torch.bool).reshape(-1)


def _take(v: Any, mask: Tensor, idx: list[int]) -> Any:
    b = len(mask)
    if isinstance(v, Tensor):
        return v[mask.to(v.device)] if v.ndim >= 1 and v.shape[0] == b else v
    if isinstance(v, (list, tuple)) and len(v) == b:
        return type(v)(v[i] for i in idx) if isinstance(v, list) else tuple(v[i] for i in idx)
    return v


def keep_valid(batch: Mapping[str, Any], valid: Tensor | None = None) -> Mapping[str, Any]:
    """``batch`` cut to its real rows: every tensor with a leading dim of ``B`` and every list/tuple of length ``B``
    (``valid`` itself included, so a second call is a no-op); other fields (scalars, strings, ``None``) as they are.

    ``valid``: the mask to apply (default: the batch's own), e.g. an eval batch's mask applied to what
    ``predict_step`` returned for it. Returns ``batch`` itself when there is no mask or every row is real; a batch
    of padding only comes back with 0 rows (see :func:`eval_rows` for a step that must still compute)."""
    mask = valid_rows(batch) if valid is None else torch.as_tensor(valid).detach().to("cpu", torch.bool).reshape(-1)
    if mask is None or bool(mask.all()):
        return batch
    idx = mask.nonzero().flatten().tolist()
    return {k: _take(v, mask, idx) for k, v in batch.items()}


def eval_rows(batch: Mapping[str, Any]) -> tuple[Mapping[str, Any], int]:
    """``(rows to compute on, number of real rows)`` for an eval step.

    Some real rows: :func:`keep_valid` and their number. Padding only: the batch's first row (a repeat of a real
    clip) and 0 — compute as usual, log with ``batch_size=0`` (zero weight; the value is finite) and add nothing
    to accumulated statistics (``batch[:n]``-style slices of the outputs are then empty)."""
    kept = keep_valid(batch)
    v = kept.get("valid") if isinstance(kept, Mapping) else None
    n = _rows(kept) if v is None else int(torch.as_tensor(v).sum())
    mask = valid_rows(batch)
    if n > 0 or v is None or mask is None or len(mask) == 0:
        return kept, n
    first = torch.zeros(len(mask), dtype=torch.bool)
    first[0] = True
    return keep_valid(batch, first), 0


def _rows(batch: Mapping[str, Any]) -> int:
    for k in ("video", "tokens", "audio", "latents", "key"):
        v = batch.get(k)
        if isinstance(v, (Tensor, list, tuple)):
            return len(v)
    for v in batch.values():
        if isinstance(v, Tensor) and v.ndim >= 1 or isinstance(v, (list, tuple)):
            return len(v)
    return 0
