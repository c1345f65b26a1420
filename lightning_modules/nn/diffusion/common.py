"""Helpers shared by the diffusion processes: per-sample means, seeded noise, the samplers' common start."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .guidance import ChannelSpec, classifier_free_guidance

__all__ = ["mean_flat", "randn", "randint", "per_sample", "masked_mean_flat", "start_sampling", "progress_bar"]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions -> ``[B]``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def masked_mean_flat(x: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample mean of ``x`` over the elements where ``mask`` (broadcastable to ``x``) is True."""
    if mask is None:
        return mean_flat(x)
    m = torch.broadcast_to(mask.to(x.dtype), x.shape)
    dims = tuple(range(1, x.ndim))
    return (x * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1.0)


def _gen_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator reproduces on any device)."""
    out = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def randint(
    high: int, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    out = torch.randint(0, high, (n,), generator=generator, device=_gen_device(generator, device))
    return out.to(device) if device is not None else out


def per_sample(values: Tensor, ndim: int) -> Tensor:
    """``[B] -> [B, 1, ..., 1]`` with ``ndim`` dims in total, for broadcasting a per-sample scalar."""
    return values[(...,) + (None,) * (ndim - values.ndim)]


def start_sampling(
    model_fn: Callable[..., Tensor],
    shape: Sequence[int],
    channel_dim: int,
    cfg_scale: float,
    uncond_kwargs: dict[str, Any] | None,
    guided_channels: ChannelSpec,
    noise: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> tuple[Callable[..., Tensor], Tensor]:
    """What every sampler does first: wrap the model with CFG and draw (or take) the starting noise in float32.

    ``guided_channels=None`` guides the C channels of ``x`` (all latent channels, as Latte); extra output channels
    (learned variances) keep the conditional output.
    """
    shape = tuple(shape)
    if guided_channels is None:
        guided_channels = shape[channel_dim]
    fn = classifier_free_guidance(model_fn, cfg_scale, uncond_kwargs, guided_channels, channel_dim)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from the sample shape {shape}")
        x = noise.to(device=device if device is not None else noise.device, dtype=torch.float32)
    else:
        x = randn(shape, generator, device)
    return fn, x


def progress_bar(steps: Iterable[int], progress: bool, desc: str) -> Iterable[int]:
    if not progress:
        return steps
    from tqdm.auto import tqdm  # optional, only when asked for

    return tqdm(steps, desc=desc)
