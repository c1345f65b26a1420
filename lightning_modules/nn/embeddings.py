"""Timestep and position embeddings shared by the DiTs (Latte, STDiT3/Tora) and the transformers.

Channel orders follow the official code (spec latte_tora.md §1.5, §1.6, §3.1):

- ``timestep_embedding``: DiT/GLIDE layout ``[cos(t f_k), sin(t f_k)]``, ``f_k = exp(-ln(max_period) k / half)``.
- ``sincos_1d``: MAE/DiT layout ``[sin(p w_k), cos(p w_k)]``, ``w_k = 10000^(-k / (D/2))``.
- ``sincos_2d``: MAE/DiT layout; tokens row-major (h outer, w inner); the FIRST half of the channels encodes the
  **w** (column) coordinate and the second half the **h** (row) coordinate (``np.meshgrid(grid_w, grid_h)`` puts w first).
  With ``scale``/``base_size`` it is Open-Sora's ``PositionEmbedding2D``.
- ``RotaryEmbedding``: ``rotary_embedding_torch`` convention (interleaved pairs, ``theta = 10000``), as used by
  STDiT3 temporal attention after QK-norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = [
    "timestep_embedding",
    "TimestepEmbedder",
    "sincos_1d",
    "sincos_2d",
    "sincos_3d",
    "RotaryEmbedding",
    "apply_rotary",
    "rotate_half",
]


# ----------------------------------------------------------------------------------------------------------------------
# Timesteps
# ----------------------------------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features ``[cos(t f_k), sin(t f_k)]`` (DiT ``TimestepEmbedder.timestep_embedding``).

    ``t``: ``[N]`` integer or fractional timesteps. Returns float32 ``[N, dim]`` (an odd ``dim`` gets a zero last column).
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape [N], got {tuple(t.shape)}; flatten it first")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """DiT timestep embedder: 256-d sinusoidal features -> Linear -> SiLU -> Linear (Latte spec §1.5)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        # keys t_embedder.mlp.{0,2}.{weight,bias}, as in DiT / Latte / STDiT3 checkpoints
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        dtype = dtype if dtype is not None else self.mlp[0].weight.dtype
        return self.mlp(t_freq.to(dtype))


# ----------------------------------------------------------------------------------------------------------------------
# Fixed sin-cos position tables
# ----------------------------------------------------------------------------------------------------------------------
def _sincos_from_positions(dim: int, pos: Tensor) -> Tensor:
    """``[sin(p w_k), cos(p w_k)]`` for float64 positions ``[M]`` -> float64 ``[M, dim]``."""
    if dim % 2:
        raise ValueError(f"sin-cos position tables need an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = torch.einsum("m,d->md", pos.to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def _as_positions(positions: int | Sequence[float] | np.ndarray | Tensor) -> Tensor:
    if isinstance(positions, int):
        return torch.arange(positions, dtype=torch.float64)
    if isinstance(positions, Tensor):
        return rearrange(positions.detach(), "... -> (...)").to(torch.float64)
    return rearrange(torch.as_tensor(np.asarray(positions, dtype=np.float64)), "... -> (...)")


def sincos_1d(dim: int, positions: int | Sequence[float] | np.ndarray | Tensor) -> Tensor:
    """1D sin-cos table ``[M, dim]`` (float32): ``[sin(p w_k), cos(p w_k)]``, ``w_k = 10000^(-2k/dim)``.

    ``positions``: an int ``M`` (positions ``0..M-1``, e.g. Latte's ``temp_embed`` over frames) or explicit positions.
    """
    return _sincos_from_positions(dim, _as_positions(positions)).float()


def sincos_2d(
    dim: int,
    grid_size: int | tuple[int, int],
    scale: float = 1.0,
    base_size: int | None = None,
) -> Tensor:
    """2D sin-cos table ``[h*w, dim]`` (float32) in the official MAE/DiT channel order.

    Tokens are row-major (``n = i*w + j`` for row ``i`` < h, column ``j`` < w). Channels ``[:dim/2]`` encode the
    column (w) coordinate, ``[dim/2:]`` the row (h) coordinate; each half is ``[sin, cos]`` (see ``sincos_1d``).
    ``grid_size``: ``s`` (square, DiT/Latte) or ``(h, w)``. ``scale``/``base_size`` give Open-Sora's
    ``PositionEmbedding2D``: coordinates ``arange(n) / scale * (base_size / n)`` per axis.
    """
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    ys = torch.arange(h, dtype=torch.float64) / scale
    xs = torch.arange(w, dtype=torch.float64) / scale
    if base_size is not None:
        ys = ys * (base_size / h)
        xs = xs * (base_size / w)
    col = repeat(xs, "w -> (h w)", h=h)  # w coordinate of each row-major token
    row = repeat(ys, "h -> (h w)", w=w)
    return torch.cat([_sincos_from_positions(dim // 2, col), _sincos_from_positions(dim // 2, row)], dim=1).float()


def sincos_3d(dim: int, grid: tuple[int, int, int], temporal_dim: int | None = None) -> Tensor:
    """3D sin-cos table ``[t*h*w, dim]``: ``[sincos_1d(temporal_dim, t) | sincos_2d(dim - temporal_dim, (h, w))]``.

    Tokens ordered ``(t h w)``. ``temporal_dim`` defaults to ``dim // 4`` rounded down to a multiple of 2 (the
    split is a common convention [unverified for any one paper]; pass it explicitly when porting weights).
    """
    t, h, w = grid
    if temporal_dim is None:
        temporal_dim = (dim // 4) // 2 * 2
    spatial_dim = dim - temporal_dim
    if temporal_dim <= 0 or temporal_dim % 2 or spatial_dim % 4:
        raise ValueError(
            f"sincos_3d: temporal_dim={temporal_dim} must be even and > 0 and dim - temporal_dim={spatial_dim} "
            "divisible by 4; pick another temporal_dim"
        )
    temporal = repeat(sincos_1d(temporal_dim, t), "t c -> (t s) c", s=h * w)
    spatial = repeat(sincos_2d(spatial_dim, (h, w)), "s c -> (t s) c", t=t)
    return torch.cat([temporal, spatial], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------------------------------
def rotate_half(x: Tensor, interleaved: bool = True) -> Tensor:
    """The 90-degree rotation of each channel pair: interleaved pairs ``(x0,x1),(x2,x3)..`` or halves ``(x_i, x_{i+d/2})``."""
    if interleaved:
        pairs = rearrange(x, "... (d r) -> ... d r", r=2)
        x1, x2 = pairs.unbind(-1)
        return rearrange(torch.stack((-x2, x1), dim=-1), "... d r -> ... (d r)")
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = True) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (``[..., N, d]``) by the angles behind ``cos``/``sin``.

    ``cos``/``sin``: ``[N, r]`` (or broadcastable to ``x[..., :r]``) with each angle repeated as its pair layout needs
    (``RotaryEmbedding.cos_sin`` builds them). Channels past ``r`` pass through unchanged (partial rotary).
    """
    r = cos.shape[-1]
    if r > x.shape[-1]:
        raise ValueError(f"rotary dim {r} exceeds head dim {x.shape[-1]}")
    x_rot, x_pass = x[..., :r], x[..., r:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = x_rot * cos + rotate_half(x_rot, interleaved) * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al.) over one axis, ``rotary_embedding_torch`` layout: frequencies ``theta^(-2k/dim)``, interleaved pairs.

    ``forward(x, positions=None, offset=0)`` rotates ``x`` ``[..., N, head_dim]`` at ``positions`` (``[N]``, or
    ``[B, N]`` for ``x`` ``[B, heads, N, d]``; default ``offset + arange(N)``). ``dim`` may be smaller than the head dim (the rest passes through).
    """

    def __init__(self, dim: int, theta: float = 10000.0, interleaved: bool = True, persistent: bool = False):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even dim, got {dim}")
        self.dim = dim
        self.theta = theta
        self.interleaved = interleaved
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        # Default: not persistent (fixed by (dim, theta); keeps checkpoints free of RoPE keys). persistent=True stores
        # them in the state dict under rotary-embedding-torch's name ``freqs`` (Open-Sora STDiT3 files carry
        # ``rope.freqs``), so such files load strictly.
        self._freq_name = "freqs" if persistent else "inv_freq"
        self.register_buffer(self._freq_name, inv_freq.float(), persistent=persistent)

    def angles(self, positions: Tensor) -> Tensor:
        """``[..., N] -> [..., N, dim/2]`` rotation angles ``p * f_k`` (float32)."""
        inv_freq = self._buffers[self._freq_name]
        return positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        ang = self.angles(positions)
        if self.interleaved:
            ang = repeat(ang, "... n -> ... (n r)", r=2)
        else:
            ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def forward(self, x: Tensor, positions: Tensor | None = None, offset: int = 0) -> Tensor:
        if positions is None:
            positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
        cos, sin = self.cos_sin(positions)
        if positions.ndim >= 2 and x.ndim == positions.ndim + 2:  # per-sample positions [B, N] with x [B, h, N, d]
            cos, sin = rearrange(cos, "b n r -> b 1 n r"), rearrange(sin, "b n r -> b 1 n r")
        return apply_rotary(x, cos, sin, self.interleaved)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, interleaved={self.interleaved}"
