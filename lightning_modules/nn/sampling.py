"""Autoregressive token sampling shared by the language models (VideoPoet §2.9; any later AR decoder).

- :func:`filter_logits` — top-k then nucleus (top-p) filtering: removed entries become ``-inf``.
- :func:`sample_logits` — temperature, top-k, top-p, seeded; ``temperature = 0`` is greedy (argmax).
- :func:`classifier_free_guidance` — ``l_u + s·(l_c − l_u)`` (Ho & Salimans 2022; ``s = 1``: the conditional model).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_logits", "sample_logits", "classifier_free_guidance"]


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose softmax mass reaches ``top_p`` (last axis).

    The most likely entry always survives. ``None``/``0`` (top-k) and ``None``/``>= 1`` (top-p) turn a filter off.
    """
    if top_k:
        k = min(int(top_k), logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely entries
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``logits [..., V]`` → long ``[...]``; ``temperature <= 0`` picks the argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    dev = generator.device if generator is not None else flat.device
    out = torch.multinomial(flat.to(dev), 1, generator=generator).to(logits.device)
    return out.reshape(probs.shape[:-1])


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Guided logits ``l_u + s·(l_c − l_u)``: ``s = 1`` is the conditional model, ``s > 1`` sharpens toward it."""
    return uncond + scale * (cond - uncond)
