"""Classifier-free guidance (Ho & Salimans 2022): ``out = out_u + s (out_c - out_u)`` on the guided channels.

Which channels are guided is an argument (spec latte_tora.md §2 "CFG"): Latte guides all latent channels
(``guided_channels=C``), DiT's original code only the first 3 ("for exact reproducibility"); channels that are not
guided (e.g. the learned-variance channels) keep the **conditional** output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ChannelSpec", "guided_channel_index", "combine_guidance", "classifier_free_guidance", "concat_kwargs"]

ChannelSpec = int | slice | Sequence[int] | None


def guided_channel_index(spec: ChannelSpec, n_channels: int) -> slice | Tensor:
    """``None`` -> all ``n_channels``; an int ``k`` -> the first ``k``; a slice or index list as given."""
    if spec is None:
        return slice(0, n_channels)
    if isinstance(spec, bool):
        raise TypeError("guided_channels must be None, an int, a slice or a list of channel indices, not a bool")
    if isinstance(spec, int):
        if not 0 < spec <= n_channels:
            raise ValueError(f"guided_channels={spec} must be in 1..{n_channels} (the model output's channel count)")
        return slice(0, spec)
    if isinstance(spec, slice):
        return spec
    index = torch.as_tensor(list(spec), dtype=torch.long)
    if index.numel() and (index.min() < 0 or index.max() >= n_channels):
        raise ValueError(f"guided_channels {list(spec)} out of range for {n_channels} output channels")
    return index


def combine_guidance(
    cond: Tensor, uncond: Tensor, scale: float, guided_channels: ChannelSpec = None, channel_dim: int = 1
) -> Tensor:
    """Guided output: ``uncond + scale (cond - uncond)`` on the guided channels, ``cond`` elsewhere."""
    if cond.shape != uncond.shape:
        raise ValueError(f"conditional and unconditional outputs differ in shape: {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    index = guided_channel_index(guided_channels, cond.shape[channel_dim])
    if isinstance(index, Tensor):
        index = index.to(cond.device)
    c = cond.movedim(channel_dim, 0)
    u = uncond.movedim(channel_dim, 0)
    out = c.clone()
    out[index] = u[index] + scale * (c[index] - u[index])
    return out.movedim(0, channel_dim)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. numpy arrays
        return False


def concat_kwargs(cond: dict[str, Any], uncond: dict[str, Any], batch: int) -> dict[str, Any]:
    """Merge conditional and unconditional model kwargs into one doubled batch ``[cond; uncond]``.

    Per-sample tensors (first dim ``batch``) are concatenated, lists are joined, equal values are kept.
    """
    if set(cond) != set(uncond):
        raise ValueError(
            f"uncond_kwargs must have the same keys as model_kwargs: {sorted(cond)} vs {sorted(uncond)}; "
            "repeat the shared ones (e.g. height/width/fps) in both"
        )
    out: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor) and isinstance(u, Tensor) and c.ndim >= 1 and c.shape[0] == batch == u.shape[0]:
            out[key] = torch.cat([c, u], dim=0)
        elif isinstance(c, list) and isinstance(u, list) and len(c) == len(u) == batch:
            out[key] = c + u
        elif _same(c, u):
            out[key] = c
        else:
            raise ValueError(
                f"cannot batch model kwarg {key!r} for guidance: give per-sample tensors/lists of length {batch} "
                "in both model_kwargs and uncond_kwargs, or equal values, or use batched=False"
            )
    return out


def classifier_free_guidance(
    model_fn: Callable[..., Tensor],
    scale: float,
    uncond_kwargs: dict[str, Any] | None,
    guided_channels: ChannelSpec = None,
    channel_dim: int = 1,
    batched: bool = True,
) -> Callable[..., Tensor]:
    """Wrap ``model_fn(x, t, **kwargs)`` into a guided one with the same signature.

    The returned function calls the model with the conditional kwargs it receives and with ``uncond_kwargs``
    (one doubled batch when ``batched``, else two calls), and returns ``combine_guidance`` of the two.
    ``scale == 1`` returns ``model_fn`` itself (the conditional model, no unconditional pass).
    """
    if scale == 1.0:
        return model_fn
    if uncond_kwargs is None:
        raise ValueError("classifier-free guidance with scale != 1 needs uncond_kwargs (the null condition)")

    def guided(x: Tensor, t: Tensor, **cond_kwargs: Any) -> Tensor:
        b = x.shape[0]
        if batched:
            out = model_fn(
                torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **concat_kwargs(cond_kwargs, uncond_kwargs, b)
            )
            out_c, out_u = out[:b], out[b:]
        else:
            out_c, out_u = model_fn(x, t, **cond_kwargs), model_fn(x, t, **uncond_kwargs)
        return combine_guidance(out_c, out_u, scale, guided_channels, channel_dim)

    return guided
