"""Optimiser pieces the models share: the warmup-cosine LR multiplier and the transformers' AdamW (MAGVIT §2.6,
VideoPoet: weight decay on Linear weights only)."""

from __future__ import annotations

import math

import torch
from torch import nn


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine to 0 at ``total`` (constant if None)."""

    def __init__(self, warmup: int, total: int | None):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if not self.total:
            return 1.0
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * frac))


def total_steps(pl_module, configured: int | None) -> int | None:
    """``configured``, else the trainer's estimated stepping batches (None when unknown or unbounded)."""
    if configured is not None or getattr(pl_module, "_trainer", None) is None:
        return configured
    est = pl_module.trainer.estimated_stepping_batches
    return int(est) if est is not None and math.isfinite(est) else None


def transformer_adamw(pl_module, net: nn.Module, lr: float, betas, weight_decay: float, warmup: int,
                      total: int | None) -> dict:
    """AdamW with weight decay on ``nn.Linear`` weights only (embeddings, norms, biases: none), linear warmup then
    cosine to 0 at ``total`` (or the trainer's length); Lightning's optimizer dict, stepped per batch."""
    decay, no_decay = [], []
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, total_steps(pl_module, total)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
