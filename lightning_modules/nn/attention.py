"""Attention written once for every model: the SDPA / xformers / math choice is made in ``attention()`` only.

Layout everywhere: ``q, k, v`` are ``[B, heads, N, d]``. Masks are boolean (True = may attend) or additive float,
broadcastable to ``[B, heads, Nq, Nk]``. ``causal=True`` is bottom-right aligned: query ``i`` sees keys
``j <= i + (Nk - Nq)``, so a chunk of new queries attending to a KV cache plus itself is causal too.

Backend choice (``set_attention_backend`` / env ``VIDGEN_ATTENTION_BACKEND``):

- ``"auto"`` (default): xformers ``memory_efficient_attention`` when xformers is installed, the tensors are on CUDA
  and the call is one it supports (no dense mask; fp16/bf16/fp32; head dim a multiple of 8, at most 256);
  otherwise PyTorch SDPA.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN kernels on GPU).
- ``"xformers"``: as auto, but asking for it without xformers installed is an error; unsupported calls
  (CPU tensors, dense masks) still fall back to SDPA.
- ``"math"``: explicit ``softmax(QK^T / sqrt(d)) V`` in float32, the reference.

xformers is optional and imported lazily; nothing here requires it.

Local windows (MaxViT / VideoPoet SR §2.8): ``MultiHeadAttention(window=(wt, wh, ww))`` attends inside
non-overlapping windows of a ``(T, H, W)`` token grid (raster order t, h, w) given to ``forward(grid=...)``;
``CrossAttention(window=..., context_window=...)`` pairs the query grid's windows one to one with the context grid's
(e.g. windows isomorphic at half the spatial size). Windows are folded into the batch axis (:class:`Windows`), so the
kernel is the same ``attention()`` as everywhere; ``window=None`` is full attention.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vidgen.lightning_modules.nn.embeddings import RotaryEmbedding

__all__ = [
    "BACKENDS",
    "attention",
    "set_attention_backend",
    "get_attention_backend",
    "attention_backend",
    "resolve_backend",
    "xformers_available",
    "causal_mask",
    "prefix_lm_mask",
    "Windows",
    "KVCache",
    "MultiHeadAttention",
    "CrossAttention",
    "Mlp",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers", "math")
_ENV = "VIDGEN_ATTENTION_BACKEND"


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    return name


_backend: str = _check_backend(os.environ.get(_ENV, "auto").strip().lower() or "auto")


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops  # optional dependency, imported lazily
    except Exception:  # noqa: BLE001 (ImportError, or a broken build that fails while importing)
        return None
    return xops


def xformers_available() -> bool:
    """True when ``xformers.ops`` imports."""
    return _xformers_ops() is not None


def set_attention_backend(name: str) -> None:
    """Force the backend for every ``attention()`` call that does not pass its own (``auto|sdpa|xformers|math``)."""
    global _backend
    name = _check_backend(name)
    if name == "xformers" and not xformers_available():
        raise RuntimeError(
            "attention backend 'xformers' was asked for but xformers is not installed; "
            "`pip install vidgen[xformers]` or use 'auto'/'sdpa'"
        )
    _backend = name


def get_attention_backend() -> str:
    return _backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Context manager: ``with attention_backend("math"): ...``."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


# ----------------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------------
def causal_mask(n_q: int, n_k: int | None = None, device: torch.device | None = None) -> Tensor:
    """Bool ``[n_q, n_k]``, bottom-right aligned: query ``i`` sees keys ``j <= i + n_k - n_q``."""
    n_k = n_q if n_k is None else n_k
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)


def prefix_lm_mask(prefix_len: int | Tensor, n: int, device: torch.device | None = None, n_q: int | None = None) -> Tensor:
    """Prefix-LM mask (VideoPoet): bidirectional over the first ``prefix_len`` tokens, causal after.

    ``prefix_len`` int -> bool ``[n, n]``; a ``[B]`` tensor -> ``[B, 1, n, n]`` (one prefix per sample).
    ``n_q``: only the last ``n_q`` query rows (bottom-aligned: new tokens attending to a KV cache plus themselves).
    """
    device = prefix_len.device if isinstance(prefix_len, Tensor) else device
    n_q = n if n_q is None else n_q
    j = torch.arange(n, device=device)
    i = torch.arange(n - n_q, n, device=device)
    causal = j[None, :] <= i[:, None]
    if isinstance(prefix_len, Tensor):
        return rearrange(causal, "i j -> 1 1 i j") | (j < prefix_len[:, None])[:, None, None, :]
    return causal | (j < prefix_len)[None, :]


def _merge_causal(mask: Tensor | None, n_q: int, n_k: int, device: torch.device) -> Tensor:
    c = causal_mask(n_q, n_k, device)
    if mask is None:
        return c
    if mask.dtype == torch.bool:
        return mask & c
    return mask.masked_fill(~c, float("-inf"))


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------
def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None) -> Tensor:
    """Reference kernel in float32; rows with every key masked give zeros (as SDPA does)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhid,bhjd->bhij", q.float() * scale, k.float())
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    row_max = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.einsum("bhij,bhjd->bhid", weights, v.float()).to(v.dtype)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _xformers_supported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> bool:
    if mask is not None or not (q.is_cuda and k.is_cuda and v.is_cuda):
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, scale: float | None) -> Tensor:
    xops = _xformers_ops()
    bias = None
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        bias = xops.LowerTriangularMask() if n_q == n_k else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)
    return rearrange(out, "b n h d -> b h n d")


def resolve_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, backend: str | None = None
) -> str:
    """The kernel ``attention()`` would run for these inputs: ``"sdpa"``, ``"xformers"`` or ``"math"``."""
    name = _check_backend(backend if backend is not None else _backend)
    if name == "math":
        return "math"
    if name in ("auto", "xformers") and xformers_available() and _xformers_supported(q, k, v, mask, causal):
        return "xformers"
    if name == "xformers" and not xformers_available():
        raise RuntimeError("attention backend 'xformers' needs xformers installed (`pip install vidgen[xformers]`)")
    return "sdpa"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    backend: str | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` over ``[B, heads, N, d]`` with the configured backend.

    ``mask``: bool (True = attend) or additive float, broadcastable to ``[B, heads, Nq, Nk]``.
    ``causal``: bottom-right aligned causal masking (combined with ``mask``). ``scale`` defaults to ``d^-0.5``.
    ``backend``: None uses the global setting (``set_attention_backend``). ``dropout_p`` is applied as given:
    pass 0 in eval.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q, k, v as [B, heads, N, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: k/v lengths or q/k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    kernel = resolve_backend(q, k, v, mask, causal, backend)
    n_q, n_k = q.shape[-2], k.shape[-2]
    if kernel == "xformers":
        try:
            return _xformers_attention(q, k, v, causal, dropout_p, scale)
        except NotImplementedError as e:  # no xformers operator for these inputs (build, GPU or shape)
            _warn_once(f"xformers cannot run this attention call ({str(e).splitlines()[0]}); using SDPA")
    if kernel == "math":
        if causal:
            mask = _merge_causal(mask, n_q, n_k, q.device)
        return _math_attention(q, k, v, mask, dropout_p, scale)
    if causal and (mask is not None or n_q != n_k):
        mask, causal = _merge_causal(mask, n_q, n_k, q.device), False
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale)


# ----------------------------------------------------------------------------------------------------------------------
# Local windows
# ----------------------------------------------------------------------------------------------------------------------
class Windows:
    """Non-overlapping ``(wt, wh, ww)`` windows of a ``(T, H, W)`` token grid flattened raster (t, h, w).

    ``split``: ``[B, T·H·W, D]`` → ``[B·nT·nH·nW, wt·wh·ww, D]`` (every token in exactly one window);
    ``merge`` is its inverse. A window entry ``None`` spans its whole axis.
    """

    def __init__(self, grid: tuple[int, int, int] | list[int], window: tuple[int | None, ...] | list[int | None]):
        if len(grid) != 3 or len(window) != 3:
            raise ValueError(f"Windows need a (T, H, W) grid and a (wt, wh, ww) window, got {grid} and {window}")
        self.grid = tuple(int(g) for g in grid)
        self.window = tuple(g if w is None else int(w) for g, w in zip(self.grid, window))
        for axis, g, w in zip("THW", self.grid, self.window):
            if w < 1 or g % w:
                raise ValueError(f"window {self.window} does not tile the token grid {self.grid}: {axis} = {g} is not a "
                                 f"multiple of {w}")
        self.counts = tuple(g // w for g, w in zip(self.grid, self.window))

    @property
    def num_windows(self) -> int:
        return self.counts[0] * self.counts[1] * self.counts[2]

    def split(self, x: Tensor) -> Tensor:
        n = self.grid[0] * self.grid[1] * self.grid[2]
        if x.shape[1] != n:
            raise ValueError(f"{x.shape[1]} tokens do not form the grid {self.grid} ({n} tokens)")
        (nt, nh, nw), (wt, wh, ww) = self.counts, self.window
        return rearrange(x, "b (nt wt nh wh nw ww) ... -> (b nt nh nw) (wt wh ww) ...",
                         nt=nt, nh=nh, nw=nw, wt=wt, wh=wh, ww=ww)

    def merge(self, x: Tensor) -> Tensor:
        (nt, nh, nw), (wt, wh, ww) = self.counts, self.window
        return rearrange(x, "(b nt nh nw) (wt wh ww) ... -> b (nt wt nh wh nw ww) ...",
                         nt=nt, nh=nh, nw=nw, wt=wt, wh=wh, ww=ww)


def _windows(window, grid, who: str) -> Windows | None:
    if window is None:
        return None
    if grid is None:
        raise ValueError(f"{who} was built with window={window}: pass grid=(T, H, W) of the tokens to forward()")
    return Windows(grid, window)


# ----------------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Keys/values of past positions for one attention layer, ``[B, heads, length, d]``.

    Either grows by concatenation (``KVCache()``) or writes into buffers preallocated with ``KVCache.allocate``
    (no reallocation per decoded token). ``update`` appends and returns all keys/values so far.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    length: int = 0

    @classmethod
    def allocate(
        cls, batch: int, heads: int, max_len: int, head_dim: int, device=None, dtype: torch.dtype | None = None
    ) -> KVCache:
        shape = (batch, heads, max_len, head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype), 0)

    @property
    def capacity(self) -> int | None:
        return None if self.k is None else self.k.shape[-2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[-2]
        if self.k is None:
            self.k, self.v, self.length = k, v, n
            return k, v
        end = self.length + n
        if end <= self.k.shape[-2] and self.length < self.k.shape[-2]:  # preallocated room
            self.k[..., self.length : end, :] = k
            self.v[..., self.length : end, :] = v
        else:
            self.k = torch.cat([self.k[..., : self.length, :], k], dim=-2)
            self.v = torch.cat([self.v[..., : self.length, :], v], dim=-2)
        self.length = end
        return self.k[..., :end, :], self.v[..., :end, :]

    def reset(self) -> None:
        self.length = 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search / dropping finished samples)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


# ----------------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------------
def _qk_norm(kind: bool | str, head_dim: int) -> nn.Module:
    if kind is False or kind is None:
        return nn.Identity()
    if kind is True or kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)  # Open-Sora STDiT3: LlamaRMSNorm(head_dim), eps 1e-6
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)  # timm ViT qk_norm
    raise ValueError(f"qk_norm must be False, True/'rms' or 'layer', got {kind!r}")


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, Eq. 1), timm/DiT parameter layout ``qkv``, ``proj``.

    ``qk_norm``: RMSNorm (True/'rms', STDiT3) or LayerNorm ('layer') per head on q and k, before RoPE.
    ``rope``: a shared ``RotaryEmbedding``, True (one over the full head dim), or None.
    ``forward(x, mask=None, kv_cache=None, positions=None, rope=None)``: returns ``out``, or ``(out, kv_cache)`` when a
    cache is passed (its keys/values are extended in place; RoPE positions continue from ``kv_cache.length``).
    ``rope`` given to ``forward`` is a rotary embedding owned by the caller (STDiT3's one top-level ``rope`` shared by
    its temporal blocks); it replaces ``self.rope`` for that call.
    ``window``: ``(wt, wh, ww)`` local-window attention over the token grid passed as ``forward(grid=(T, H, W))``
    (MaxViT-style, e.g. one axis per layer); no mask, KV cache or RoPE with windows.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool | str = False,
        rope: RotaryEmbedding | bool | None = None,
        causal: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
        window: tuple[int | None, int | None, int | None] | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window = None if window is None else tuple(window)
        if self.window is not None and (rope or causal):
            raise ValueError("MultiHeadAttention: local windows go without rope and causal masking")
        self.causal = causal
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.rope = RotaryEmbedding(self.head_dim) if rope is True else (rope or None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        positions: Tensor | None = None,
        rope: RotaryEmbedding | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> Tensor | tuple[Tensor, KVCache]:
        win = _windows(self.window, grid, "MultiHeadAttention")
        if win is not None:
            if mask is not None or kv_cache is not None or rope is not None:
                raise ValueError("MultiHeadAttention with local windows takes no mask, kv_cache or rope")
            x = win.split(x)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        rope = self.rope if rope is None else rope
        if rope is not None:
            if positions is None:
                offset = kv_cache.length if kv_cache is not None else 0
                positions = torch.arange(offset, offset + x.shape[1], device=x.device)
            q, k = rope(q, positions), rope(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = attention(
            q, k, v, mask=mask, causal=self.causal, backend=self.backend,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        out = self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
        if win is not None:
            out = win.merge(out)
        return out if kv_cache is None else (out, kv_cache)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from ``x`` to a context (Open-Sora ``MultiHeadCrossAttention`` keys).

    ``context_mask``: bool ``[B, M]``, True for real context tokens (padding is ignored). With a ``kv_cache`` the
    context keys/values are computed on the first call and reused afterwards (autoregressive decoding).
    ``window`` / ``context_window``: windowed cross-attention (VideoPoet SR §2.8): the query grid
    ``forward(grid=...)`` and the context grid ``forward(context_grid=...)`` are cut into the same number of windows
    per axis and window ``i`` of the queries attends only to window ``i`` of the context.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool | str = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
        window: tuple[int | None, int | None, int | None] | None = None,
        context_window: tuple[int | None, int | None, int | None] | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttention: dim={dim} is not divisible by heads={heads}")
        if (window is None) != (context_window is None):
            raise ValueError("CrossAttention: give both window and context_window (windowed) or neither (full)")
        self.window = None if window is None else tuple(window)
        self.context_window = None if context_window is None else tuple(context_window)
        context_dim = dim if context_dim is None else context_dim
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.attn_drop = attn_drop
        self.backend = backend
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None,
        context_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        grid: tuple[int, int, int] | None = None,
        context_grid: tuple[int, int, int] | None = None,
    ) -> Tensor | tuple[Tensor, KVCache]:
        win = _windows(self.window, grid, "CrossAttention")
        if win is not None:
            cwin = _windows(self.context_window, context_grid, "CrossAttention (context)")
            if cwin.counts != win.counts:
                raise ValueError(f"CrossAttention windows do not pair up: the queries' grid {win.grid} / {win.window} "
                                 f"gives {win.counts} windows per axis, the context's {cwin.grid} / {cwin.window} "
                                 f"gives {cwin.counts}")
            if kv_cache is not None or context is None:
                raise ValueError("windowed CrossAttention needs its context each call (no kv_cache)")
            x, context = win.split(x), cwin.split(context)
            if context_mask is not None:
                context_mask = cwin.split(context_mask)
        q = self.q_norm(rearrange(self.q_linear(x), "b n (h d) -> b h n d", h=self.heads))
        if kv_cache is not None and kv_cache.k is not None:
            k, v = kv_cache.k[..., : kv_cache.length, :], kv_cache.v[..., : kv_cache.length, :]
        else:
            if context is None:
                raise ValueError("CrossAttention needs a context (or a filled kv_cache)")
            k, v = rearrange(self.kv_linear(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
            k = self.k_norm(k)
            if kv_cache is not None:
                kv_cache.update(k, v)
        mask = None
        if context_mask is not None:
            if context_mask.ndim != 2 or context_mask.shape[-1] != k.shape[-2]:
                raise ValueError(
                    f"context_mask must be bool [B, M={k.shape[-2]}] (True = real token), got {tuple(context_mask.shape)}"
                )
            mask = rearrange(context_mask.bool(), "b m -> b 1 1 m")
        out = attention(q, k, v, mask=mask, backend=self.backend, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
        if win is not None:
            out = win.merge(out)
        return out if kv_cache is None else (out, kv_cache)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


class Mlp(nn.Module):
    """Transformer feed-forward ``fc2(drop(act(fc1(x))))`` (timm ``Mlp`` keys ``fc1``/``fc2``).

    ``act``: 'gelu_tanh' (DiT/Latte/STDiT3), 'gelu', 'silu', 'relu' or an ``nn.Module`` factory.
    ``gated=True`` makes it GLU-style (``fc1`` outputs 2*hidden; ``act(a) * b``: GEGLU / SwiGLU).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act: str | Callable[[], nn.Module] = "gelu_tanh",
        drop: float = 0.0,
        bias: bool = True,
        gated: bool = False,
    ):
        super().__init__()
        hidden_features = hidden_features or 4 * in_features
        out_features = out_features or in_features
        if isinstance(act, str):
            if act not in _ACTIVATIONS:
                raise ValueError(f"Mlp act must be one of {sorted(_ACTIVATIONS)} or a module factory, got {act!r}")
            act = _ACTIVATIONS[act]
        self.gated = gated
        self.fc1 = nn.Linear(in_features, hidden_features * (2 if gated else 1), bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            h = self.act(a) * b
        else:
            h = self.act(h)
        return self.drop2(self.fc2(self.drop1(h)))
