"""VideoPoet super-resolution transformer (Kondratyuk et al., ICML 2024, §3.3 / A.5.2; spec
make_a_video_videopoet.md §2.8): non-autoregressive, bidirectional, in MAGVIT-v2 token space, two cascaded 2x stages.

Reading order, as in the paper:

1. :class:`TokenFactorization` — token factorisation ``k = 2``: an 18-bit code becomes two 9-bit sub-tokens (bits
   17..9, then 8..0 [split unverified]); :class:`FactorizedEmbedding` merges the sub-token embeddings **by sum** (the
   paper allows sum or concat; sum keeps the width independent of ``k``); :class:`FactorizedHead` is the two 512-way
   classifications; :func:`factorized_loss` is their cross-entropies added.
2. :class:`AxisWindowLayer` — one transformer layer: local-window self-attention along one axis (MaxViT-style),
   windowed cross-attention to the low-resolution tokens in the isomorphic window at half the spatial size, MLP.
   Windows are ``nn.attention``'s (``MultiHeadAttention(window=...)``, ``CrossAttention(context_window=...)``).
3. :class:`SRBlock` — three layers (vertical, horizontal, temporal; ``WINDOWS`` holds the table of §2.8) plus the
   cross-attention to the text embeddings that every block has.
4. :func:`dual_guidance` — classifier-free guidance applied separately to text and LR (InstructPix2Pix form).
5. :class:`VideoPoetSR` — the LightningModule: MAGVIT masked-token objective; LR condition = the tokens of the
   bicubically downsampled ground truth with token-space noise (a random fraction of LR tokens resampled);
   independent 10% drops of LR and text; 24-step non-autoregressive decoding (``nn.masking.masked_decode``).
6. ``SR_SIZES`` — stage 1 (1B), stage 2 (500M) and tiny; the paper gives only parameter counts [unverified dims].

Choices the paper leaves open, made once here [unverified]: pre-LN residual layers; the text cross-attention opens
each block; learned absolute per-axis position embeddings (t, h, w summed) for the HR and LR grids; a dropped LR
condition is every LR token replaced by the ``[MASK]`` sub-tokens, a dropped text is one learned null embedding;
the noise fraction of each sample is ``U(0, lr_noise)``; the masked-token loss is the cross-entropy on the masked
positions (MaskGIT), per sub-token head, summed over heads (``loss_tokens: all``: on every HR position, MAGVIT's
mask+recons weighting).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .nn.attention import CrossAttention, Mlp, MultiHeadAttention, Windows
from .nn.masking import SCHEDULES, masked_decode, random_token_mask, sample_mask_ratio
from .nn.sampling import classifier_free_guidance
from .nn.batches import eval_rows
from .nn.step_logs import log_step
from .nn.seeding import step_generator, training_stream
from .videopoet import VideoPoet, _hidden

__all__ = [
    "SRConfigError", "TokenFactorization", "FactorizedEmbedding", "FactorizedHead", "factorized_loss",
    "AXES", "WINDOWS", "lr_window", "SRTransformerConfig", "AxisWindowLayer", "SRBlock", "SRTransformer",
    "dual_guidance", "bicubic_downsample", "VideoPoetSRConfig", "VideoPoetSR", "SR_SIZES",
]


class SRConfigError(ValueError):
    """A super-resolution setting that cannot work; the message names the key and the fix."""


# ====================================================================================================================
# §2.8 Token factorisation
# ====================================================================================================================
class TokenFactorization:
    """§2.8 ``k``-way token factorisation: a ``bits``-bit code ↔ ``k`` sub-tokens of ``bits/k`` bits, most
    significant first (18 bits, k = 2: bits 17..9 and 8..0). The code ``codebook`` (= ``2^bits``) is ``[MASK]``."""

    def __init__(self, bits: int, k: int = 2):
        if bits < 1 or k < 1 or bits % k:
            raise SRConfigError(f"token factorisation needs bits divisible by factors: {bits} bits, k = {k}")
        self.bits, self.k = bits, k
        self.sub_bits = bits // k
        self.sub_codes = 2 ** self.sub_bits
        self.codebook = 2 ** bits
        self.mask_id = self.codebook

    def _shifts(self, device) -> Tensor:
        return self.sub_bits * torch.arange(self.k - 1, -1, -1, device=device)

    def split(self, codes: Tensor) -> Tensor:
        """Codes ``[...]`` → sub-tokens ``[..., k]`` (``[MASK]`` → ``sub_codes`` in every factor)."""
        codes = codes.long()
        sub = (codes.clamp(0, self.codebook - 1)[..., None] >> self._shifts(codes.device)) & (self.sub_codes - 1)
        return torch.where((codes == self.mask_id)[..., None], self.sub_codes, sub)

    def merge(self, sub: Tensor) -> Tensor:
        """Sub-tokens ``[..., k]`` → codes ``[...]``."""
        return (sub.long() << self._shifts(sub.device)).sum(-1)


class FactorizedEmbedding(nn.Module):
    """§2.8 input side: one table per sub-token (``2^(bits/k)`` codes + ``[MASK]``); a code embeds as the **sum** of
    its ``k`` sub-token embeddings."""

    def __init__(self, fact: TokenFactorization, dim: int):
        super().__init__()
        self.fact = fact
        self.tables = nn.ModuleList(nn.Embedding(fact.sub_codes + 1, dim) for _ in range(fact.k))

    def forward(self, codes: Tensor) -> Tensor:
        sub = self.fact.split(codes)
        return sum(table(sub[..., j]) for j, table in enumerate(self.tables))


class FactorizedHead(nn.Module):
    """§2.8 output side: ``k`` linear heads, each a ``2^(bits/k)``-way classification of its sub-token."""

    def __init__(self, fact: TokenFactorization, dim: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, fact.sub_codes) for _ in range(fact.k))

    def forward(self, h: Tensor) -> list[Tensor]:
        return [head(h) for head in self.heads]


def factorized_loss(logits: Sequence[Tensor], codes: Tensor, fact: TokenFactorization, weight: Tensor,
                    label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Masked-token cross-entropy of each sub-token head (``Σ w·CE / Σ w``, rows pooled) and their sum ``loss``."""
    target = fact.split(codes)
    w = weight.float()
    denom = w.sum().clamp_min(1.0)
    out = {}
    for j, lg in enumerate(logits):
        ce = F.cross_entropy(rearrange(lg.float(), "b n k -> b k n"), target[..., j], reduction="none",
                             label_smoothing=label_smoothing)
        out[f"head{j}"] = (w * ce).sum() / denom
    out["loss"] = sum(out[f"head{j}"] for j in range(len(logits)))
    return out


# ====================================================================================================================
# §2.8 Windows (table) and the blocks
# ====================================================================================================================
AXES = ("vertical", "horizontal", "temporal")

#: §2.8 window table (T, H, W) per stage; the first spatial axis is the 224-pixel one
WINDOWS: dict[str, dict[str, tuple[int, int, int]]] = {
    "stage1": {"vertical": (1, 56, 4), "horizontal": (1, 8, 32), "temporal": (5, 8, 8)},    # grid (5, 56, 32)
    "stage2": {"vertical": (1, 112, 2), "horizontal": (1, 4, 64), "temporal": (5, 8, 8)},   # grid (5, 112, 64)
}


def lr_window(window: Sequence[int], scale: int = 2) -> tuple[int, int, int]:
    """§2.8: the LR cross-attention window is isomorphic to the self-attention window at half the spatial size."""
    wt, wh, ww = window
    if wh % scale or ww % scale:
        raise SRConfigError(f"window {tuple(window)} has an odd spatial size: the LR window (half size) would not be "
                            "whole; use even window heights and widths")
    return wt, wh // scale, ww // scale


@dataclass
class SRTransformerConfig:
    """The SR transformer of §2.8 (sizes in ``SR_SIZES``)."""

    bits: int
    grid: tuple[int, int, int]                      # HR token grid (T, H, W)
    windows: dict[str, tuple[int, int, int]]        # per axis, on the HR grid
    factors: int = 2
    width: int = 256
    depth: int = 2                                  # blocks of three layers
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 64
    dropout: float = 0.0
    attention: str = "window"                       # "window" (paper) | "full" (benchmark baseline)
    scale: int = 2                                  # spatial upsampling factor of the stage

    @property
    def lr_grid(self) -> tuple[int, int, int]:
        t, h, w = self.grid
        return t, h // self.scale, w // self.scale


class AxisPositions(nn.Module):
    """Learned absolute position per axis, summed: ``p_t[t] + p_h[h] + p_w[w]`` over a raster (t, h, w) grid."""

    def __init__(self, grid: Sequence[int], dim: int):
        super().__init__()
        self.grid = tuple(grid)
        self.t, self.h, self.w = (nn.Parameter(torch.randn(n, dim) * 0.02) for n in self.grid)

    def forward(self) -> Tensor:
        t, h, w = self.grid
        pos = self.t[:, None, None] + self.h[None, :, None] + self.w[None, None, :]
        return rearrange(pos, "t h w d -> 1 (t h w) d")


class AxisWindowLayer(nn.Module):
    """One of a block's three layers (§2.8): local-window self-attention along one axis, windowed cross-attention to
    the LR tokens (isomorphic window at half the spatial size), MLP; pre-LN residuals [unverified]."""

    def __init__(self, cfg: SRTransformerConfig, axis: str):
        super().__init__()
        d = cfg.width
        window = None if cfg.attention == "full" else tuple(cfg.windows[axis])
        self.axis = axis
        self.norm1 = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, cfg.heads, window=window, proj_drop=cfg.dropout)
        self.norm2 = nn.LayerNorm(d)
        self.lr_attn = CrossAttention(d, d, cfg.heads, window=window,
                                      context_window=None if window is None else lr_window(window, cfg.scale),
                                      proj_drop=cfg.dropout)
        self.norm3 = nn.LayerNorm(d)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), act="gelu", drop=cfg.dropout)

    def forward(self, x: Tensor, lr: Tensor, grid: tuple[int, int, int], lr_grid: tuple[int, int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), grid=grid)
        x = x + self.lr_attn(self.norm2(x), lr, grid=grid, context_grid=lr_grid)
        return x + self.mlp(self.norm3(x))


class SRBlock(nn.Module):
    """§2.8 block: cross-attention to the text embeddings ("all blocks"), then the vertical, horizontal and temporal
    local-window layers."""

    def __init__(self, cfg: SRTransformerConfig):
        super().__init__()
        self.text_norm = nn.LayerNorm(cfg.width)
        self.text_attn = CrossAttention(cfg.width, cfg.text_dim, cfg.heads, proj_drop=cfg.dropout)
        self.layers = nn.ModuleList(AxisWindowLayer(cfg, axis) for axis in AXES)

    def forward(self, x: Tensor, lr: Tensor, text: Tensor, text_mask: Tensor, grid, lr_grid) -> Tensor:
        x = x + self.text_attn(self.text_norm(x), text, text_mask)
        for layer in self.layers:
            x = layer(x, lr, grid, lr_grid)
        return x


class SRTransformer(nn.Module):
    """§2.8 network: factorised HR and LR token embeddings + positions → blocks → LN → factorised heads."""

    def __init__(self, cfg: SRTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.fact = TokenFactorization(cfg.bits, cfg.factors)
        self.embed = FactorizedEmbedding(self.fact, cfg.width)
        self.lr_embed = FactorizedEmbedding(self.fact, cfg.width)
        self.pos = AxisPositions(cfg.grid, cfg.width)
        self.lr_pos = AxisPositions(cfg.lr_grid, cfg.width)
        self.null_text = nn.Parameter(torch.randn(cfg.text_dim) * 0.02)
        self.blocks = nn.ModuleList(SRBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = FactorizedHead(self.fact, cfg.width)

    def forward(self, tokens: Tensor, lr_tokens: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None,
                keep_text: Tensor | None = None) -> list[Tensor]:
        """``tokens [B, N]`` HR codes (``[MASK]`` = ``2^bits``), ``lr_tokens [B, M]`` (all ``[MASK]`` = dropped),
        ``text [B, L, D]`` with ``text_mask [B, L]``; ``keep_text [B]`` False → the null text → ``k`` logits."""
        B = tokens.shape[0]
        x = self.embed(tokens) + self.pos()
        lr = self.lr_embed(lr_tokens) + self.lr_pos()
        null = repeat(self.null_text, "d -> b 1 d", b=B)
        if text is None:
            text, text_mask = null, torch.ones(B, 1, dtype=torch.bool, device=x.device)
        else:
            text = torch.cat([null, text.to(x.dtype)], 1)
            given = torch.ones(B, text.shape[1] - 1, dtype=torch.bool, device=x.device) if text_mask is None \
                else text_mask.bool()
            real = F.pad(given, (1, 0), value=False)     # the null slot is seen only when the text is dropped
            keep = torch.ones(B, dtype=torch.bool, device=x.device) if keep_text is None else keep_text.bool()
            keep = keep & real[:, 1:].any(-1)              # an empty caption is the null text too
            only_null = torch.zeros_like(real)
            only_null[:, 0] = True
            text_mask = torch.where(keep[:, None], real, only_null)
        for block in self.blocks:
            x = block(x, lr, text, text_mask, self.cfg.grid, self.cfg.lr_grid)
        return self.head(self.norm(x))


# ====================================================================================================================
# §2.8 Inference: separate guidance for text and LR
# ====================================================================================================================
def dual_guidance(full: Tensor, lr_only: Tensor | None, none: Tensor | None, text_scale: float,
                  lr_scale: float) -> Tensor:
    """InstructPix2Pix-style guidance (§2.8): ``l(∅,∅) + s_LR·(l(LR,∅) − l(∅,∅)) + s_T·(l(LR,T) − l(LR,∅))``.

    ``full`` = l(LR, text), ``lr_only`` = l(LR, ∅), ``none`` = l(∅, ∅). With ``s_LR = 1`` the unconditional term
    cancels (``none`` may be None); with both scales 1 the result is ``full``.
    """
    if text_scale == 1.0 and lr_scale == 1.0:
        return full
    if lr_only is None:
        raise ValueError("dual_guidance needs l(LR, no text) when a scale is not 1")
    base = lr_only if lr_scale == 1.0 else classifier_free_guidance(lr_only, none, lr_scale)
    return base + text_scale * (full - lr_only)


def bicubic_downsample(video: Tensor, scale: int = 2) -> Tensor:
    """§2.8 LR condition: each frame of ``[B, C, T, H, W]`` bicubically downsampled by ``scale`` (antialiased)."""
    b = video.shape[0]
    frames = rearrange(video.float(), "b c t h w -> (b t) c h w")
    small = F.interpolate(frames, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return rearrange(small.clamp(-1, 1), "(b t) c h w -> b c t h w", b=b)


# ====================================================================================================================
# Config
# ====================================================================================================================
@dataclass
class VideoPoetSRConfig:
    """One SR stage (§2.8); every key of ``VideoPoetSR.__init__``."""

    size: str = "tiny"
    stage: str = "stage1"                          # which window table of WINDOWS applies ("custom": `windows`)
    tokenizer_path: str | None = None
    visual_codes: int | None = None
    token_grid: list[int] | None = None            # HR token grid (T, H, W); default from the tokenizer
    num_frames: int = 17
    resolution: list[int] = field(default_factory=lambda: [448, 256])   # HR pixels (H, W)
    windows: dict[str, list[int]] | None = None
    factors: int = 2
    attention: str = "window"
    text_encoder: dict | None = None
    text_dim: int | None = None
    max_text_tokens: int = 64
    text_dropout: float = 0.1
    lr_dropout: float = 0.1
    lr_noise: float = 0.2                          # max fraction of LR tokens resampled [unverified: not given]
    mask_schedule: str = "cosine"
    label_smoothing: float = 0.0
    loss_tokens: str = "masked"                    # "masked" (MaskGIT) | "all" (MAGVIT's mask+recons weighting)
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    dropout: float = 0.0
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.96])
    weight_decay: float = 0.045
    warmup_steps: int = 1000
    total_steps: int | None = None
    seed: int = 0
    decode_steps: int = 24
    text_guidance: float = 4.0
    lr_guidance: float = 1.0
    temperature: float = 1.0
    choice_temperature: float = 4.5
    num_samples: int = 4

    def validate(self) -> None:
        """Raise :class:`SRConfigError` naming the key and the fix; reads no files."""
        import os

        if self.size not in SR_SIZES:
            raise SRConfigError(f"size must be one of {list(SR_SIZES)}, got {self.size!r}")
        if self.stage not in (*WINDOWS, "custom"):
            raise SRConfigError(f"stage must be one of {[*WINDOWS, 'custom']} (custom: give windows), got {self.stage!r}")
        if self.stage == "custom" and not self.windows:
            raise SRConfigError("stage: custom needs windows: {vertical: [t, h, w], horizontal: [...], temporal: [...]}")
        if self.windows is not None and set(self.windows) != set(AXES):
            raise SRConfigError(f"windows must give exactly {list(AXES)}, got {sorted(self.windows)}")
        if self.attention not in ("window", "full"):
            raise SRConfigError(f"attention must be 'window' (paper) or 'full', got {self.attention!r}")
        if self.tokenizer_path is None and (self.visual_codes is None or self.token_grid is None):
            raise SRConfigError("set tokenizer_path (a VideoTokenizer checkpoint), or visual_codes and token_grid to "
                                "train on cached token batches (tokens + lr_tokens) only")
        if self.tokenizer_path is not None and not os.path.exists(self.tokenizer_path):
            raise SRConfigError(f"tokenizer_path {self.tokenizer_path!r} does not exist: train one (vidgen fit "
                                "--config configs/videopoet/tokenizer_lfq_tiny.yaml) or point at its checkpoint")
        if self.visual_codes is not None and (self.visual_codes < 2 or self.visual_codes & (self.visual_codes - 1)):
            raise SRConfigError(f"visual_codes must be a power of two (LFQ: 2^bits), got {self.visual_codes}")
        if self.text_encoder is None and self.text_dim is None:
            raise SRConfigError("set text_encoder (e.g. {kind: hf, path: /local/t5-v1_1-xl}) or text_dim (the width "
                                "of cached text embeddings)")
        for key in ("text_dropout", "lr_dropout", "lr_noise"):
            if not 0 <= getattr(self, key) < 1:
                raise SRConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if self.loss_tokens not in ("masked", "all"):
            raise SRConfigError(f"loss_tokens must be 'masked' (MaskGIT) or 'all' (MAGVIT), got {self.loss_tokens!r}")
        if self.mask_schedule not in SCHEDULES:
            raise SRConfigError(f"mask_schedule must be one of {SCHEDULES}, got {self.mask_schedule!r}")
        if self.decode_steps < 1:
            raise SRConfigError(f"decode_steps must be >= 1 (paper: 24), got {self.decode_steps}")
        if self.text_guidance != 1.0 and self.text_dropout <= 0:
            raise SRConfigError("text_guidance != 1 needs the unconditional text branch: train with text_dropout > 0")
        if self.lr_guidance != 1.0 and self.lr_dropout <= 0:
            raise SRConfigError("lr_guidance != 1 needs the unconditional LR branch: train with lr_dropout > 0")
        if len(self.resolution) != 2 or any(r % 2 for r in self.resolution):
            raise SRConfigError(f"resolution must be [H, W] with even sides (the LR is half), got {self.resolution}")
        if self.token_grid is not None:
            self.check_grid(tuple(self.token_grid))

    def window_table(self) -> dict[str, tuple[int, int, int]]:
        return {a: tuple(w) for a, w in (self.windows or WINDOWS[self.stage]).items()}

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        if len(grid) != 3 or grid[1] % 2 or grid[2] % 2:
            raise SRConfigError(f"token_grid must be (T, H, W) with even H and W (the LR grid is half), got {grid}")
        lr = (grid[0], grid[1] // 2, grid[2] // 2)
        for axis, w in self.window_table().items():
            try:
                Windows(grid, w)
                Windows(lr, lr_window(w))
            except ValueError as e:
                raise SRConfigError(f"windows.{axis} {tuple(w)} does not fit the token grid {grid} (LR {lr}): {e}; "
                                    "pick windows that divide the grid") from None

    def net(self, bits: int, grid: tuple[int, int, int], text_dim: int) -> SRTransformerConfig:
        depth, width, heads = SR_SIZES[self.size]
        return SRTransformerConfig(bits=bits, grid=tuple(grid), windows=self.window_table(), factors=self.factors,
                                   width=self.width or width, depth=self.depth or depth, heads=self.heads or heads,
                                   text_dim=text_dim, dropout=self.dropout, attention=self.attention)


# ====================================================================================================================
# LightningModule
# ====================================================================================================================
class VideoPoetSR(L.LightningModule):
    """One 2x super-resolution stage of VideoPoet (§2.8), trained with the MAGVIT masked-token objective.

    Batches: ``tokens`` [B, T', H', W'] HR codes with ``lr_tokens`` [B, T', H'/2, W'/2] (cached), or ``video``
    [B, C, T, H, W] (HR ground truth; tokenised with the frozen tokenizer, the LR from its bicubic downsample);
    ``text`` captions or cached ``text_emb`` [B, L, D] + ``text_len`` [B].
    """

    fsdp_block_classes = (SRBlock,)
    # the LM's text path (frozen encoder, cached embeddings, padding to max_text_tokens), shared
    encode_text = VideoPoet.encode_text
    text_of = VideoPoet.text_of
    configure_optimizers = VideoPoet.configure_optimizers

    def __init__(
        self,
        size: str = "tiny",
        stage: str = "stage1",
        tokenizer_path: str | None = None,
        visual_codes: int | None = None,
        token_grid: list[int] | None = None,
        num_frames: int = 17,
        resolution: list[int] | int | None = None,
        windows: dict[str, list[int]] | None = None,
        factors: int = 2,
        attention: str = "window",
        text_encoder: dict | None = None,
        text_dim: int | None = None,
        max_text_tokens: int = 64,
        text_dropout: float = 0.1,
        lr_dropout: float = 0.1,
        lr_noise: float = 0.2,
        mask_schedule: str = "cosine",
        label_smoothing: float = 0.0,
        loss_tokens: str = "masked",
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        dropout: float = 0.0,
        lr: float = 1e-3,
        betas: list[float] | None = None,
        weight_decay: float = 0.045,
        warmup_steps: int = 1000,
        total_steps: int | None = None,
        seed: int = 0,
        decode_steps: int = 24,
        text_guidance: float = 4.0,
        lr_guidance: float = 1.0,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        num_samples: int = 4,
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters()
        self.config = cfg = self.make_config(args)
        cfg.validate()
        _hidden(self, "tokenizer", None)
        _hidden(self, "text_model", None)
        if cfg.tokenizer_path is not None:
            from .video_tokenizer import VideoTokenizer

            self.attach_tokenizer(VideoTokenizer.load_frozen(cfg.tokenizer_path), check=False)
            if cfg.visual_codes not in (None, self.tokenizer.codebook_size):
                raise SRConfigError(f"visual_codes={cfg.visual_codes} disagrees with the tokenizer "
                                    f"({self.tokenizer.codebook_size}); drop it")
            cfg.visual_codes = self.tokenizer.codebook_size
            if cfg.token_grid is None:
                cfg.token_grid = list(self.tokenizer.token_shape(cfg.num_frames, *cfg.resolution))
                cfg.check_grid(tuple(cfg.token_grid))
        if cfg.text_encoder is not None:
            from .nn.text_encoders import build_text_encoder

            _hidden(self, "text_model", build_text_encoder(cfg.text_encoder))
            if cfg.text_dim not in (None, self.text_model.token_dim):
                raise SRConfigError(f"text_dim={cfg.text_dim} disagrees with the text encoder "
                                    f"({self.text_model.token_dim}); drop it")
            cfg.text_dim = self.text_model.token_dim
        # what the tokenizer and text encoder resolved, so a checkpoint rebuilds without them (load_frozen)
        self.hparams.update(visual_codes=int(cfg.visual_codes), token_grid=list(cfg.token_grid), text_dim=int(cfg.text_dim))
        bits = int(cfg.visual_codes).bit_length() - 1
        self.net = SRTransformer(cfg.net(bits, tuple(cfg.token_grid), int(cfg.text_dim)))
        self.fact = self.net.fact

    # ---------------------------------------------------------------------------------------------------- config
    @staticmethod
    def make_config(args: Mapping[str, Any]) -> VideoPoetSRConfig:
        names = {f.name for f in fields(VideoPoetSRConfig)}
        a = {k: v for k, v in args.items() if k in names and v is not None}
        if isinstance(a.get("resolution"), int):                # the datamodule's square resolution (linked)
            a["resolution"] = [a["resolution"]] * 2
        for k in ("betas", "resolution", "token_grid"):
            if k in a:
                a[k] = [int(x) if k != "betas" else float(x) for x in a[k]]
        if "windows" in a:
            a["windows"] = {k: [int(x) for x in v] for k, v in dict(a["windows"]).items()}
        return VideoPoetSRConfig(**a)

    @classmethod
    def validate_config(cls, init_args: Mapping[str, Any]) -> None:
        """Called by the CLI before anything is built."""
        sig = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(init_args) - sig
        if unknown:
            raise SRConfigError(f"unknown VideoPoetSR arguments {sorted(unknown)}; allowed: {sorted(sig)}")
        cls.make_config(init_args).validate()

    @classmethod
    def load_frozen(cls, path: str, map_location: str | torch.device = "cpu", tokenizer: bool = False) -> "VideoPoetSR":
        """An eval-mode SR stage from a checkpoint (EMA weights when it has them), for the predict cascade (token in,
        token out: its tokenizer is loaded only with ``tokenizer=True``)."""
        import warnings

        from .nn.checkpoint import KeyReport, ema_state_dict, safe_load

        ckpt = safe_load(path, map_location=map_location)
        if "hyper_parameters" not in ckpt:
            raise SRConfigError(f"{path} has no hyper_parameters; it is not a VideoPoetSR checkpoint")
        hp = dict(ckpt["hyper_parameters"])
        if not tokenizer:
            hp["tokenizer_path"] = None
        model = cls(**hp)
        with warnings.catch_warnings():  # a checkpoint without EMA gives its raw weights
            warnings.simplefilter("ignore")
            sd = ema_state_dict(ckpt)
        report = KeyReport.compare(sd, model.state_dict(), source=path, kind="VideoPoet SR", model="sr")
        if not report.exact:
            raise SRConfigError(f"{path} does not match the SR stage its hyper-parameters describe:\n{report.table()}")
        model.load_state_dict(sd)
        model.eval().requires_grad_(False)
        return model

    def attach_tokenizer(self, tokenizer: nn.Module, check: bool = True) -> None:
        """Use ``tokenizer`` (frozen, eval) for the LR condition and decoding; never saved in checkpoints."""
        tokenizer.eval()
        for p in tokenizer.parameters():
            p.requires_grad_(False)
        if check and tokenizer.codebook_size != self.config.visual_codes:
            raise SRConfigError(f"tokenizer has {tokenizer.codebook_size} codes; the SR stage was built for "
                                f"{self.config.visual_codes}")
        _hidden(self, "tokenizer", tokenizer)

    def attach_text_encoder(self, encoder: nn.Module) -> None:
        if encoder.token_dim != self.net.cfg.text_dim:
            raise SRConfigError(f"text encoder width {encoder.token_dim} != the SR stage's text_dim {self.net.cfg.text_dim}")
        _hidden(self, "text_model", encoder)

    def _tok(self) -> nn.Module:
        if self.tokenizer is None:
            raise RuntimeError("this SR stage has no tokenizer: set tokenizer_path or call attach_tokenizer()")
        return self.tokenizer.to(self.device)

    # ---------------------------------------------------------------------------------------------------- inputs
    @property
    def grid(self) -> tuple[int, int, int]:
        return self.net.cfg.grid

    @property
    def lr_grid(self) -> tuple[int, int, int]:
        return self.net.cfg.lr_grid

    @torch.no_grad()
    def lr_tokens_of_video(self, video: Tensor) -> Tensor:
        """§2.8 LR condition: tokens of the bicubically 2x-downsampled clip."""
        return self._tok().encode(bicubic_downsample(video.to(self.device))).long()

    def token_pair(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(HR codes ``[B, N]``, LR codes ``[B, M]``) from cached tokens or from the HR video."""
        if batch.get("tokens") is not None and batch.get("lr_tokens") is not None:
            hr, lr = (torch.as_tensor(batch[k]).to(self.device).long() for k in ("tokens", "lr_tokens"))
        elif batch.get("video") is not None:
            video = batch["video"].to(self.device)
            with torch.no_grad():
                hr = self._tok().encode(video).long()
            lr = self.lr_tokens_of_video(video)
        else:
            raise ValueError("an SR batch needs 'tokens' and 'lr_tokens' (cached) or 'video' (HR ground truth)")
        for name, z, g in (("tokens", hr, self.grid), ("lr_tokens", lr, self.lr_grid)):
            if tuple(z.shape[1:]) != tuple(g):
                raise ValueError(f"{name} have grid {tuple(z.shape[1:])}; this SR stage was built for {g} "
                                 "(token_grid / resolution / num_frames)")
            if int(z.min()) < 0 or int(z.max()) >= self.fact.codebook:
                raise ValueError(f"{name} must lie in [0, {self.fact.codebook}): re-tokenise with this stage's tokenizer")
        return rearrange(hr, "b t h w -> b (t h w)"), rearrange(lr, "b t h w -> b (t h w)")

    def noise_lr(self, lr: Tensor, generator: torch.Generator) -> Tensor:
        """§2.8 token-space noise augmentation: per sample, a fraction ``U(0, lr_noise)`` of the LR tokens is
        resampled uniformly from the codebook."""
        if self.config.lr_noise <= 0:
            return lr
        B, M = lr.shape
        frac = torch.rand(B, 1, generator=generator) * self.config.lr_noise
        hit = (torch.rand(B, M, generator=generator) < frac).to(lr.device)
        rand = torch.randint(0, self.fact.codebook, (B, M), generator=generator).to(lr.device)
        return torch.where(hit, rand, lr)

    def condition_drops(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """§2.8: drop the LR condition and the text **independently**, each with its rate (10%) → two bool ``[B]``."""
        drop_lr = torch.rand(batch_size, generator=generator) < self.config.lr_dropout
        drop_text = torch.rand(batch_size, generator=generator) < self.config.text_dropout
        return drop_lr, drop_text

    # ---------------------------------------------------------------------------------------------------- training
    def step_loss(self, batch: Mapping[str, Any], step: int, stream: int = 0) -> dict[str, Tensor]:
        """MAGVIT masked-token loss of one batch (§2.8): mask ``γ(u)`` of the HR tokens, noise the LR tokens, drop LR
        and text independently (10% each), cross-entropy of both sub-token heads on the masked positions. The draws
        are a function of ``(seed, step, stream)`` (``nn.seeding``: each rank and micro-batch its own stream)."""
        c = self.config
        hr, lr = self.token_pair(batch)
        B, N = hr.shape
        g = step_generator(c.seed, step, stream)
        ratio = sample_mask_ratio(g, c.mask_schedule, N)
        masked = random_token_mask(B, N, ratio, g, hr.device)
        inputs = torch.where(masked, self.fact.mask_id, hr)
        lr_in = self.noise_lr(lr, g)
        drop_lr, drop_text = (d.to(hr.device) for d in self.condition_drops(B, g))
        lr_in = torch.where(drop_lr[:, None], self.fact.mask_id, lr_in)
        emb, ln = self.text_of(batch, B)
        text_mask = None if emb is None else torch.arange(emb.shape[1], device=hr.device)[None] < ln[:, None]
        logits = self.net(inputs, lr_in, emb, text_mask, keep_text=~drop_text)
        weight = masked if c.loss_tokens == "masked" else torch.ones_like(masked)
        out = factorized_loss(logits, hr, self.fact, weight, c.label_smoothing)
        with torch.no_grad():
            pred = self.fact.merge(torch.stack([lg.argmax(-1) for lg in logits], -1))
            out["acc"] = (pred == hr)[masked].float().mean()
        out["mask_ratio"] = torch.tensor(ratio)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.step_loss(batch, self.global_step, training_stream(self, batch_idx))
        n = len(batch["tokens"]) if batch.get("tokens") is not None else len(batch["video"])
        log_step(self, {"train/loss": out["loss"], **{f"train/loss_head{j}": out[f"head{j}"] for j in range(self.fact.k)},
                        "train/acc": out["acc"]}, n)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch, n = eval_rows(batch)  # DDP padding dropped (all padding: one row logged with weight 0)
        out = self.step_loss(batch, 10_000_019 + batch_idx)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/acc", out["acc"], sync_dist=True, batch_size=n)
        return out["loss"]

    # ---------------------------------------------------------------------------------------------------- sampling
    def guided_logits(self, tokens: Tensor, lr: Tensor, text: Tensor | None, text_mask: Tensor | None,
                      text_scale: float, lr_scale: float) -> list[Tensor]:
        """Per sub-token head, :func:`dual_guidance` of the branches the scales need, batched in one forward."""
        B = tokens.shape[0]
        no_lr = torch.full_like(lr, self.fact.mask_id)
        rows = [(lr, True)]                                  # l(LR, T)
        if text_scale != 1.0 or lr_scale != 1.0:
            rows.append((lr, False))                         # l(LR, ∅)
        if lr_scale != 1.0:
            rows.append((no_lr, False))                      # l(∅, ∅)
        n = len(rows)
        keep = torch.cat([torch.full((B,), k, dtype=torch.bool, device=tokens.device) for _, k in rows])
        cat = (lambda t: None if t is None else torch.cat([t] * n))
        logits = self.net(cat(tokens), torch.cat([r for r, _ in rows]), cat(text), cat(text_mask), keep_text=keep)
        out = []
        for lg in logits:
            parts = list(lg.float().split(B)) + [None] * (3 - n)
            out.append(dual_guidance(parts[0], parts[1], parts[2], text_scale, lr_scale))
        return out

    @torch.inference_mode()
    def super_resolve(self, lr_tokens: Tensor, batch: Mapping[str, Any] | None = None,
                      generator: torch.Generator | None = None, steps: int | None = None,
                      text_guidance: float | None = None, lr_guidance: float | None = None,
                      temperature: float | None = None) -> Tensor:
        """LR codes ``[B, T', H'/2, W'/2]`` → HR codes ``[B, T', H', W']`` by 24-step non-autoregressive decoding
        (MAGVIT-v2 / MaskGIT) with separate text and LR guidance (§2.8); captions from ``batch``."""
        c = self.config
        steps = c.decode_steps if steps is None else steps
        ts = c.text_guidance if text_guidance is None else text_guidance
        ls = c.lr_guidance if lr_guidance is None else lr_guidance
        temp = c.temperature if temperature is None else temperature
        if tuple(lr_tokens.shape[1:]) != tuple(self.lr_grid):
            raise ValueError(f"LR tokens of grid {tuple(lr_tokens.shape[1:])}; this stage upsamples {self.lr_grid}")
        was = self.net.training
        self.net.eval()
        lr = rearrange(lr_tokens.to(self.device).long(), "b t h w -> b (t h w)")
        B = lr.shape[0]
        emb, ln = self.text_of(dict(batch or {}), B)
        mask = None if emb is None else torch.arange(emb.shape[1], device=self.device)[None] < ln[:, None]

        def logits_fn(tokens: Tensor, unknown: Tensor) -> list[Tensor]:
            return self.guided_logits(torch.where(unknown, self.fact.mask_id, tokens), lr, emb, mask, ts, ls)

        fallback = torch.full((B, math.prod(self.grid)), self.fact.mask_id, dtype=torch.long, device=self.device)
        try:
            codes = masked_decode(logits_fn, fallback, steps=steps, temperature=temp,
                                  choice_temperature=c.choice_temperature, schedule=c.mask_schedule,
                                  generator=generator)
        finally:
            self.net.train(was)
        t, h, w = self.grid
        return rearrange(codes, "b (t h w) -> b t h w", t=t, h=h, w=w)

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """2x super-resolved videos ``[B, C, T, H, W]`` in [−1, 1] of ``batch['lr_tokens']``, ``batch['lr_video']``
        (the LR clip) or ``batch['video']`` (HR ground truth, bicubically downsampled first)."""
        batch = dict(batch or {})
        if batch.get("lr_tokens") is not None:
            lr = torch.as_tensor(batch["lr_tokens"]).long()
        elif batch.get("lr_video") is not None:
            lr = self._tok().encode(batch["lr_video"].to(self.device)).long()
        elif batch.get("video") is not None:
            lr = self.lr_tokens_of_video(batch["video"])
        else:
            raise ValueError("SR generate needs batch['lr_tokens'], batch['lr_video'] or batch['video']")
        if num_samples is not None:
            lr = lr[:num_samples]
        return self._tok().decode(self.super_resolve(lr, batch, generator)).float().clamp(-1, 1)

    def prediction_inputs(self) -> dict:
        """An SR stage upsamples clips: ``vidgen predict`` needs ``--data.init_args.predict_shards`` (HR clips; the
        LR input is their bicubic downsample)."""
        return {"kind": "video"}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``videos`` (super-resolved), ``keys``, ``captions`` and ``cond_videos`` (the LR input, bicubic 2x up for
        side-by-side viewing). Writes no files."""
        g = torch.Generator().manual_seed(self.config.seed + batch_idx * 100003 + self.global_rank)
        videos = self.generate(batch, generator=g)
        n = videos.shape[0]
        keys = list(batch.get("key") or [f"{batch_idx:05d}_{i:03d}" for i in range(n)])[:n]
        out = {"videos": videos, "keys": keys, "captions": list(batch.get("text") or [""] * n)[:n]}
        if batch.get("video") is not None:
            lowres = bicubic_downsample(batch["video"][:n].to(self.device))
            b = lowres.shape[0]
            up = F.interpolate(rearrange(lowres, "b c t h w -> (b t) c h w"), scale_factor=2, mode="bicubic")
            out["cond_videos"] = rearrange(up.clamp(-1, 1), "(b t) c h w -> b c t h w", b=b)
        return out


# ====================================================================================================================
# Size table (§2.8): blocks (of three layers), width, heads. Only the parameter counts are published [unverified]
# ====================================================================================================================
SR_SIZES: dict[str, tuple[int, int, int]] = {
    "1B": (5, 2048, 16),        # stage 1 [unverified]: ~52·d² per block (3×(self 4d² + LR cross 4d² + MLP 8d²) + text)
    "500M": (4, 1536, 12),      # stage 2 [unverified]: ~0.49B
    "tiny": (2, 64, 4),         # laptop CPU / tests / demo
}
