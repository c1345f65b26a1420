"""Masked-token modelling helpers shared by MAGVIT (spec magvit.md §2.3, Part 3) and later non-AR decoders.

- :func:`mask_ratio` — the schedule ``γ(x)`` (cosine by default: ``cos(π/2·x)``).
- :func:`sample_mask_ratio` — one training ratio ``r = γ(u)``, ``u ~ U[0, 1)``, clipped to [1e-6, 1] (§2.3).
- :func:`random_token_mask` — mask the ``clip(floor(N·r), 1, N)`` positions with the lowest uniform scores.
- :func:`masked_decode` — MaskGIT / COMMIT iterative decoding (Algorithm 1): sample every unknown position, keep the
  most confident, re-mask the rest to a per-position *fallback* token (``[MASK]``, or the condition token ``z̃``
  under COMMIT).  Batched, seeded, no per-token Python loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["SCHEDULES", "mask_ratio", "sample_mask_ratio", "random_token_mask", "gumbel_noise", "num_masked",
           "DecodeStep", "masked_decode"]

SCHEDULES = ("cosine", "linear", "square", "exp")
Schedule = Literal["cosine", "linear", "square", "exp"]


def mask_ratio(x: float | Tensor, schedule: Schedule = "cosine", num_tokens: int | None = None) -> float | Tensor:
    """Fraction of tokens still masked at progress ``x ∈ [0, 1]`` (``γ(0) = 1``, ``γ(1) = 0``).

    ``cosine``: ``cos(π/2·x)`` (MAGVIT default); ``linear``: ``1 − x``; ``square``: ``1 − x²``;
    ``exp``: ``1 − 2^{−log2(N)·(1−x)}`` (MAGVIT BAIR "single" eval variant; needs ``num_tokens``).
    """
    is_t = isinstance(x, Tensor)
    if schedule == "cosine":
        return torch.cos(math.pi / 2 * x) if is_t else math.cos(math.pi / 2 * x)
    if schedule == "linear":
        return 1 - x
    if schedule == "square":
        return 1 - x * x
    if schedule == "exp":
        if not num_tokens:
            raise ValueError("the 'exp' mask schedule needs num_tokens (N in 1 − 2^{−log2(N)(1−x)})")
        e = -math.log2(num_tokens) * (1 - x)
        return 1 - (torch.pow(2.0, e) if is_t else 2.0 ** e)
    raise ValueError(f"unknown mask schedule {schedule!r}; choose one of {SCHEDULES}")


def sample_mask_ratio(generator: torch.Generator | None = None, schedule: Schedule = "cosine",
                      num_tokens: int | None = None) -> float:
    """One training mask ratio ``γ(u)``, ``u ~ U[0, 1)``, clipped to [1e-6, 1] (§2.3: one per step)."""
    u = float(torch.rand((), generator=generator))
    return float(min(1.0, max(1e-6, mask_ratio(u, schedule, num_tokens))))


def num_masked(num_tokens: int, ratio: float) -> int:
    """``clip(floor(N·r), 1, N)``: how many of ``N`` tokens a ratio masks (§2.3)."""
    return int(min(num_tokens, max(1, math.floor(num_tokens * ratio))))


def random_token_mask(batch: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """Bool ``[B, N]``: per row, the ``num_masked(N, ratio)`` positions with the lowest ``U(0, 1)`` scores."""
    g_dev = generator.device if generator is not None else "cpu"
    scores = torch.rand(batch, num_tokens, generator=generator, device=g_dev).to(device)
    n = num_masked(num_tokens, ratio)
    idx = scores.topk(n, dim=-1, largest=False).indices
    return torch.zeros(batch, num_tokens, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)


def frame_suffix_mask(batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """Bool ``[B, t*h*w]``: per row a latent frame ``k ~ U{0..t-1}``; frames before ``k`` unmasked, ``num_masked(h*w,
    ratio)`` random positions of frame ``k`` masked, every later frame masked: the inputs ``decode_order: frames``
    decodes from (the frames so far known, the current one partly sampled, the rest at their fallback)."""
    t, h, w = grid
    g_dev = generator.device if generator is not None else "cpu"
    k = torch.randint(0, t, (batch, 1), generator=generator, device=g_dev).to(device)
    within = random_token_mask(batch, h * w, ratio, generator, device).repeat(1, t)
    frame = torch.arange(t * h * w, device=within.device) // (h * w)
    return (frame[None] > k) | ((frame[None] == k) & within)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Standard Gumbel noise ``−log(−log U)`` (float32)."""
    g_dev = generator.device if generator is not None else "cpu"
    u = torch.rand(shape, generator=generator, device=g_dev).to(device)
    return -torch.log((-torch.log(u.clamp_(1e-20, 1.0))).clamp_min(1e-20))


@dataclass
class DecodeStep:
    """What one decoding iteration saw and did (returned with ``return_history=True``)."""

    inputs: Tensor     # [B, N] tokens fed to the model at this step
    unknown: Tensor    # [B, N] bool: positions that were unknown (to be sampled) at this step
    sampled: Tensor    # [B, N] this step's tokens (fixed ones kept, unknown ones sampled)
    remasked: Tensor   # [B, N] bool: positions left unknown for the next step


@torch.inference_mode()
def masked_decode(
    logits_fn: Callable[[Tensor, Tensor], Tensor],
    fallback: Tensor,
    steps: int = 12,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    schedule: Schedule = "cosine",
    generator: torch.Generator | None = None,
    return_history: bool = False,
) -> Tensor | tuple[Tensor, list[DecodeStep]]:
    """Non-autoregressive decoding (MAGVIT Algorithm 1 / MaskGIT), spec Part 3.

    Args:
        logits_fn: ``(tokens [B, N], unknown [B, N] bool) -> logits [B, N, K]`` over the ``K`` codes (guidance, e.g.
            CFG with the condition tokens replaced by ``[MASK]`` where unknown, is the caller's).  Factorised codes
            (VideoPoet SR §2.8): a tuple of logits ``[B, N, K_j]``, one per sub-token, most significant first; each
            sub-token is sampled independently, the code is ``Σ_j s_j·Π_{i>j} K_i`` and its confidence ``Σ_j log p(s_j)``.
        fallback: ``[B, N]`` long: what an unknown position holds — ``[MASK]`` or, under COMMIT, the condition
            token ``z̃_i`` in the condition region.  Step 0 starts from it with every position unknown.
        steps: ``K`` iterations (12); ``temperature``: token sampling temperature (1.0);
        choice_temperature: ``τ`` of the re-masking Gumbel noise, annealed as ``τ·(1 − (t+1)/K)`` (4.5).

    Each step samples ``ẑ_i ~ Cat(softmax(ℓ_i / T))`` at unknown positions (fixed ones keep their token), scores
    ``log p(ẑ_i) + τ(1 − (t+1)/K)·Gumbel`` (``+∞`` for fixed positions) and re-masks the
    ``clip(floor(N·γ((t+1)/K)), 1, n_unknown − 1)`` lowest to ``fallback``.  Returns the sampled tokens of the
    last iteration at all ``N`` positions (so condition tokens are refined, not copied).
    """
    if fallback.dim() != 2:
        raise ValueError(f"fallback must be [B, N] tokens, got shape {tuple(fallback.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b, n_tok = fallback.shape
    device = fallback.device
    tokens = fallback.clone()
    unknown = torch.ones(b, n_tok, dtype=torch.bool, device=device)
    history: list[DecodeStep] = []
    sampled = tokens
    for t in range(steps):
        out = logits_fn(tokens, unknown)
        factors = list(out) if isinstance(out, (tuple, list)) else [out]
        draw, conf = torch.zeros_like(tokens), torch.zeros(b, n_tok, device=device)
        for logits in factors:  # factorised heads (VideoPoet SR §2.8): independent sub-tokens, most significant first
            logits = logits.float()
            if logits.shape[:2] != (b, n_tok):
                raise ValueError(f"logits_fn returned {tuple(logits.shape)}, expected [{b}, {n_tok}, K]")
            logp = torch.log_softmax(logits, dim=-1)
            # categorical sample by Gumbel-max at temperature T (T -> 0: argmax)
            if temperature > 0:
                g = gumbel_noise(tuple(logits.shape), generator, device)
                d = (logp / temperature + g).argmax(-1)
            else:
                d = logp.argmax(-1)
            draw = draw * logits.shape[-1] + d
            conf = conf + torch.gather(logp, -1, d[..., None])[..., 0]
        sampled = torch.where(unknown, draw, tokens)
        conf = torch.where(unknown, conf, torch.full_like(conf, math.inf))
        ratio = float(mask_ratio((t + 1) / steps, schedule, n_tok))
        n_unknown = unknown.sum(-1)
        n_mask = torch.clamp(torch.minimum(n_unknown - 1, torch.full_like(n_unknown, math.floor(n_tok * ratio))),
                             min=1)
        anneal = choice_temperature * (1.0 - (t + 1) / steps)
        score = conf + anneal * gumbel_noise((b, n_tok), generator, device)
        rank = score.argsort(-1).argsort(-1)
        remask = rank < n_mask[:, None]
        if return_history:
            history.append(DecodeStep(tokens.clone(), unknown.clone(), sampled.clone(), remask.clone()))
        tokens = torch.where(remask, fallback, sampled)
        unknown = remask
    return (sampled, history) if return_history else sampled
