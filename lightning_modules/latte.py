"""Latte: Latent Diffusion Transformer for Video Generation (Ma et al., arXiv 2401.03048). Spec: latte_tora.md §1, §2.

A frozen VAE maps each frame to latents; a DiT-style transformer predicts the noise (and a learned variance) of
DDPM on the latent clip ``[B, F, C, H, W]`` (the official layout: frames before channels):

1. patch embedding (§1.4): per-frame ViT patches (*uniform*) or ViViT tubes of temporal stride s (*compression*,
   with a 3D transposed conv restoring the frame count at the output);
2. + fixed 2D sin-cos ``pos_embed`` on every frame; the fixed 1D ``temp_embed`` enters before the first temporal
   mixing, or RoPE in temporal attention instead (§1.6);
3. spatio-temporal transformer, one of four variants (§1.3):
   V1 interleaved spatial/temporal blocks, V2 late fusion (all spatial, then all temporal), V3 factorised attention
   inside a block (spatial MHA -> temporal MHA -> MLP), V4 head-split attention (half the heads spatial, half temporal);
4. condition (§1.5): timestep (+ class label, or the flattened caption token states as in the official ``extras=78``
   path) through S-AdaLN (DiT adaLN-Zero) or as extra tokens;
5. final layer: LN -> modulate -> linear -> unpatchify -> ``[B, F, 2C, H, W]`` (eps, variance values).

``depth`` counts spatial and temporal blocks together (official code): V1/V2 have ``depth`` blocks (even indices
spatial in V1; the first half spatial in V2). V3/V4 have ``depth/2`` blocks, each doing what one spatial + temporal
pair of V1 does [unverified choice: the paper's block counts for V3/V4 are not in the code].

Image-video joint training (§1.8, "Latte+IMG"): ``use_image_num`` stills follow the video frames on the frame axis.
Spatial blocks and the final layer see them (each with its own label/caption condition); temporal mixing skips
them. Data side [our choice]: the stills of clip b are random frames of *other* clips in the same batch (b itself
when B = 1), each carrying that clip's label or caption; the loss averages over all frames; sampling uses none.

Checkpoints (§1.9, §1.10): ``LatteTransformer`` keeps the official key names, so official Latte files
(``{"ema", "model"}``, legacy ``time_embed``) load strictly, and an ImageNet DiT initialises V1 (label table dropped
when the class counts differ). ``KeyReport`` prints what was loaded.

Text-to-video, two families (``LatteConfig.family``):

- ``dit`` (the above): ``condition="text"`` is the official ``extras=78`` path: the caption's token states
  (CLIP ViT-L/14, 77 x 768) are flattened, projected by ``SiLU -> Linear`` and added to the timestep embedding of
  every block; the final layer is modulated by the timestep alone.
- ``pixart``: the released Latte-1 (``maxin-cn/Latte-1``), ``LattePixArtTransformer``: PixArt-alpha blocks
  (adaLN-single, cross-attention to T5 tokens) in the variant-1 order, the math of diffusers'
  ``LatteTransformer3DModel``, whose directory format (config.json + safetensors) it reads and writes.

Latents: ``batch["latents"]`` (``[B, C, T, H, W]`` raw VAE latents, e.g. the ``{key}.npy`` of ``vidgen tokenize``
latent shards; ``vae.scale_factor`` is applied) is used when present; otherwise ``batch["video"]`` is encoded by the
frozen VAE (``vidgen.lightning_modules.nn.vae``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from vidgen.lightning_modules.nn.checkpoint import (
    EMA_PREFIX,
    KeyReport,
    ema_state_dict,
    raw_state_dict,
    read_state_dict,
    safe_load,
)
from vidgen.lightning_modules.nn.init import xavier_linears_
from vidgen.lightning_modules.nn.attention import CrossAttention, Mlp, MultiHeadAttention, attention
from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion
from vidgen.lightning_modules.nn.embeddings import RotaryEmbedding, TimestepEmbedder, sincos_1d, sincos_2d
from vidgen.lightning_modules.nn.optim import cpu_multi_tensor
from vidgen.lightning_modules.nn.batches import eval_rows
from vidgen.lightning_modules.nn.step_logs import log_step
from vidgen.lightning_modules.nn.text_encoders import TextEncoderConfig, build_text_encoder
from vidgen.lightning_modules.nn.vae import VAEConfig, spatial_factor_of
from vidgen.lightning_modules.video_tokenizer import latent_autoencoder

__all__ = [
    "LatteConfig",
    "LatteConfigError",
    "PatchEmbed",
    "TubeEmbed",
    "LabelEmbedder",
    "TransformerBlock",
    "FactorizedBlock",
    "HeadSplitAttention",
    "FinalLayer",
    "LatteTransformer",
    "PixArtBlock",
    "T2IFinalLayer",
    "LattePixArtTransformer",
    "diffusers_config",
    "latte_kwargs_from_diffusers",
    "read_diffusers",
    "write_diffusers",
    "export_diffusers",
    "KeyReport",
    "read_checkpoint",
    "Latte",
    "LATTE_SIZES",
    "LATTE_MODELS",
]

FAMILIES = ("dit", "pixart")
VARIANTS = (1, 2, 3, 4)
PATCH_EMBEDDINGS = ("uniform", "tube")
CONDITIONINGS = ("adaln", "tokens")
CONDITIONS = ("class", "text", "none")
TEMPORAL_POS = ("absolute", "rope")


class LatteConfigError(ValueError):
    """A Latte setting that cannot work; the message names the setting and the fix."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise LatteConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


# ----------------------------------------------------------------------------------------------------------------------
# Network config
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class LatteConfig:
    """The transformer's shape and options (sizes: ``LATTE_SIZES`` at the bottom of this file).

    input_size: latent height = width; num_frames: latent frames of a video clip; in_channels: latent channels.
    variant 1-4 (§1.3); patch_embedding uniform | tube (stride ``tube_stride``, §1.4); conditioning adaln | tokens and
    condition class | text | none (§1.5); temporal_pos absolute | rope (§1.6).
    text_tokens x text_dim: the caption token states (official ``extras=78``: CLIP ViT-L/14, 77 x 768); the DiT family
    flattens them, the PixArt family cross-attends to them (``text_dim`` = T5 width, 4096 for Latte-1).

    family: ``dit`` = the paper's blocks (DiT adaLN-Zero, everything above); ``pixart`` = the released Latte-1 T2V
    network (PixArt-alpha blocks: adaLN-single, cross-attention to the caption tokens; diffusers
    ``LatteTransformer3DModel``), variant 1 with uniform patches, absolute positions and condition='text' only.
    PixArt family only: sample_size (the latent size the 2D sin-cos table is laid out for, diffusers ``sample_size``;
    None = input_size), norm_affine / norm_eps (its LayerNorms), attention_bias (q/k/v biases).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16
    variant: int = 1
    patch_embedding: str = "uniform"
    tube_stride: int = 2
    conditioning: str = "adaln"
    condition: str = "class"
    num_classes: int = 101
    class_dropout_prob: float = 0.1
    text_tokens: int = 77
    text_dim: int = 768
    temporal_pos: str = "absolute"
    learn_sigma: bool = True
    family: str = "dit"
    sample_size: int | None = None
    norm_affine: bool = False
    norm_eps: float = 1e-6
    attention_bias: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_size(cls, name: str, **kwargs: Any) -> LatteConfig:
        """``LatteConfig.from_size("XL/2", num_classes=101)``; names as in ``LATTE_MODELS`` (with or without "Latte-")."""
        key = name if name.startswith("Latte-") else f"Latte-{name}"
        if key not in LATTE_MODELS:
            raise LatteConfigError(f"unknown Latte size {name!r}; choose one of {sorted(LATTE_MODELS)}")
        return cls(**{**LATTE_MODELS[key], **kwargs})

    def validate(self) -> None:
        _choice("family", self.family, FAMILIES)
        _choice("variant", self.variant, VARIANTS)
        _choice("patch_embedding", self.patch_embedding, PATCH_EMBEDDINGS)
        _choice("conditioning", self.conditioning, CONDITIONINGS)
        _choice("condition", self.condition, CONDITIONS)
        _choice("temporal_pos", self.temporal_pos, TEMPORAL_POS)
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LatteConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.input_size % self.patch_size:
            raise LatteConfigError(
                f"latent size {self.input_size} is not divisible by patch_size {self.patch_size}; "
                "change the resolution or the patch size (2, 4 or 8)"
            )
        if self.depth % 2:
            raise LatteConfigError(f"depth={self.depth} must be even: it counts spatial and temporal blocks together")
        if self.hidden_size % self.num_heads:
            raise LatteConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise LatteConfigError(f"hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos position table)")
        if self.variant == 4 and self.num_heads % 2:
            raise LatteConfigError(f"variant 4 splits the heads in half; num_heads={self.num_heads} must be even")
        if self.conditioning == "tokens" and self.variant not in (1, 2):
            raise LatteConfigError(
                f"conditioning='tokens' is implemented for variants 1 and 2 (the paper ablates it there), "
                f"not variant {self.variant}; use conditioning='adaln'"
            )
        if self.patch_embedding == "tube":
            if self.tube_stride < 1 or self.num_frames % self.tube_stride:
                raise LatteConfigError(
                    f"tube embedding: num_frames={self.num_frames} (latent frames) must be a multiple of "
                    f"tube_stride={self.tube_stride}"
                )
        if self.condition == "class" and self.num_classes < 1:
            raise LatteConfigError(f"condition='class' needs num_classes >= 1, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise LatteConfigError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.condition == "text" and (self.text_tokens < 1 or self.text_dim < 1):
            raise LatteConfigError(f"condition='text' needs text_tokens, text_dim >= 1, got {self.text_tokens}, {self.text_dim}")
        if self.family == "pixart":
            fixed = {"variant": 1, "patch_embedding": "uniform", "conditioning": "adaln", "condition": "text",
                     "temporal_pos": "absolute", "mlp_ratio": 4.0}
            for name, want in fixed.items():
                if getattr(self, name) != want:
                    raise LatteConfigError(
                        f"family='pixart' (the released Latte-1 T2V network) has {name}={want!r}, got "
                        f"{getattr(self, name)!r}; set {name}: {want!r} or use family='dit'"
                    )
            if self.sample_size is not None and (self.sample_size < self.patch_size or self.sample_size % self.patch_size):
                raise LatteConfigError(f"sample_size={self.sample_size} must be a multiple of patch_size={self.patch_size}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def temporal_stride(self) -> int:
        return self.tube_stride if self.patch_embedding == "tube" else 1

    @property
    def token_frames(self) -> int:
        """n_f: frames of tokens (F, or F / s with tubes)."""
        return self.num_frames // self.temporal_stride

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------------
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x (1 + scale) + shift`` with per-row ``shift``/``scale`` ``[N, d]`` over ``x [N, L, d]``."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _repeat_rows(c: Tensor, n: int) -> Tensor:
    """Condition rows ``[g, ...]`` -> ``[n, ...]`` by repeating each row ``n / g`` times (``b -> (b s)``)."""
    g = c.shape[0]
    if g == n:
        return c
    if n % g:
        raise ValueError(f"{n} sequences cannot share {g} condition rows")
    return repeat(c, "g ... -> (g r) ...", r=n // g)


def _check_latents(cfg: LatteConfig, x: Tensor) -> None:
    if x.ndim != 5 or x.shape[2] != cfg.in_channels or x.shape[-1] != cfg.input_size or x.shape[-2] != cfg.input_size:
        raise ValueError(
            f"Latte expects latents [B, F, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}] (frames before "
            f"channels), got {tuple(x.shape)}"
        )


def over_time(x: Tensor, batch: int, n_video: int, fn) -> Tensor:
    """Run ``fn`` on the video frames in the temporal layout ``[(B S), F, d]``; stills (frames past ``n_video``) pass
    unchanged (§1.8). ``x``: ``[(B F'), S, d]``."""
    xt = rearrange(x, "(b f) s d -> (b s) f d", b=batch)
    video, stills = xt[:, :n_video], xt[:, n_video:]
    video = fn(video)
    xt = torch.cat([video, stills], dim=1) if stills.shape[1] else video
    return rearrange(xt, "(b s) f d -> (b f) s d", b=batch)


def unpatchify(x: Tensor, grid: int, patch_size: int) -> Tensor:
    """``[N, S, p²·C] -> [N, C, H, W]`` (official ``nhwpqc -> nchpwq``)."""
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid, w=grid, p=patch_size, q=patch_size)


class PatchEmbed(nn.Module):
    """Uniform frame patch embedding (§1.4, Fig. 3a): a ViT patchify (Conv2d, kernel = stride = p) per frame."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, F, C, H, W] -> [(B F), (H/p W/p), d]`` (tokens row-major)."""
        frames = rearrange(x, "b f c h w -> (b f) c h w")
        return rearrange(self.proj(frames), "n d h w -> n (h w) d")


class TubeEmbed(nn.Module):
    """Compression frame patch embedding (§1.4, Fig. 3b): ViViT tubes of s frames x p x p (Conv3d, kernel = stride)."""

    def __init__(self, patch_size: int, tube_stride: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size, self.tube_stride = patch_size, tube_stride
        kernel = (tube_stride, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, F, C, H, W] -> [(B F/s), (H/p W/p), d]``."""
        tubes = self.proj(rearrange(x, "b f c h w -> b c f h w"))
        return rearrange(tubes, "b d f h w -> (b f) (h w) d")


class LabelEmbedder(nn.Module):
    """Class embedding with label dropout for classifier-free guidance (§1.5): row K is the null class.

    Labels < 0 (absent, the batch contract's -1) are embedded as the null class.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def has_null(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        labels = labels.long()
        if self.has_null:
            labels = torch.where(labels < 0, self.num_classes, labels)
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    """A Latte block (DiT adaLN-Zero, §1.2; S-AdaLN of §1.5): spatial or temporal by the sequences it is given.

    ``conditioning="adaln"``: ``x += g·Attn(LN(x)(1+γ)+β)``, the same for the MLP, (β, γ, g) from ``Linear(SiLU(c))``.
    ``conditioning="tokens"``: the condition tokens ``c [N, k, d]`` are prepended to every sequence, the block is a
    plain pre-LN transformer block, and the condition tokens are dropped again.
    ``attn``: another attention module (variant 4's ``HeadSplitAttention``); extra forward kwargs go to it.
    Conditions may have fewer rows than ``x`` has sequences: each row is then shared by ``N / rows`` consecutive
    sequences (``b -> (b s)`` in temporal blocks).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        conditioning: str = "adaln",
        rope: bool = False,
        attn: nn.Module | None = None,
    ):
        super().__init__()
        self.conditioning = conditioning
        affine = conditioning == "tokens"
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)
        self.attn = attn if attn is not None else MultiHeadAttention(hidden_size, num_heads, qkv_bias=True, rope=rope or None)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        if conditioning == "adaln":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, **attn_kwargs: Any) -> Tensor:
        if self.conditioning == "tokens":
            k = c.shape[-2]
            h = torch.cat([_repeat_rows(c, x.shape[0]).to(x.dtype), x], dim=1)
            h = h + self.attn(self.norm1(h), **attn_kwargs)
            h = h + self.mlp(self.norm2(h))
            return h[:, k:]
        mods = _repeat_rows(self.adaLN_modulation(c), x.shape[0])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), **attn_kwargs)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FactorizedBlock(nn.Module):
    """Variant 3 (§1.3): factorised self-attention in one block, spatial MHA -> temporal MHA -> MLP (ViViT model 3).

    adaLN-Zero with 9 chunks (shift, scale, gate for each of the three branches) [unverified layout]. The temporal
    branch sees the first ``n_video`` frames only (stills bypass it) and gets ``temp_pos`` added first when given.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, rope: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(hidden_size, num_heads, qkv_bias=True)
        self.norm_temporal = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn_temporal = MultiHeadAttention(hidden_size, num_heads, qkv_bias=True, rope=rope or None)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size, bias=True))

    def forward(
        self, x: Tensor, c_frames: Tensor, c_video: Tensor, batch: int, n_video: int, temp_pos: Tensor | None = None
    ) -> Tensor:
        mods = _repeat_rows(self.adaLN_modulation(c_frames), x.shape[0]).chunk(9, dim=-1)
        x = x + mods[2][:, None] * self.attn(modulate(self.norm1(x), mods[0], mods[1]))
        xt = rearrange(x, "(b f) s d -> (b s) f d", b=batch)
        video, stills = xt[:, :n_video], xt[:, n_video:]
        if temp_pos is not None:
            video = video + temp_pos
        tmods = _repeat_rows(self.adaLN_modulation(c_video), video.shape[0]).chunk(9, dim=-1)
        video = video + tmods[5][:, None] * self.attn_temporal(modulate(self.norm_temporal(video), tmods[3], tmods[4]))
        xt = torch.cat([video, stills], dim=1) if stills.shape[1] else video
        x = rearrange(xt, "(b s) f d -> (b f) s d", b=batch)
        x = x + mods[8][:, None] * self.mlp(modulate(self.norm2(x), mods[6], mods[7]))
        return x


class HeadSplitAttention(nn.Module):
    """Variant 4 (§1.3): heads [0, h/2) attend over space within a frame, heads [h/2, h) over time at a position.

    The two halves are concatenated and projected by one ``proj`` (equal to adding the projected halves). Stills
    (frames past ``n_video``) attend only to themselves in the temporal half, i.e. pass their values through.
    Keys ``qkv``/``proj`` as in ``MultiHeadAttention``.
    """

    def __init__(self, hidden_size: int, num_heads: int, rope: bool = False):
        super().__init__()
        self.heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.rope = RotaryEmbedding(hidden_size // num_heads) if rope else None

    def forward(self, x: Tensor, batch: int, n_video: int) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "n s (three h e) -> three n h s e", three=3, h=self.heads)
        half = self.heads // 2
        spatial = attention(q[:, :half], k[:, :half], v[:, :half])
        qt, kt, vt = (rearrange(z[:, half:], "(b f) h s e -> (b s) h f e", b=batch) for z in (q, k, v))
        qv, kv = qt[:, :, :n_video], kt[:, :, :n_video]
        if self.rope is not None:
            qv, kv = self.rope(qv), self.rope(kv)
        temporal = attention(qv, kv, vt[:, :, :n_video])
        if vt.shape[2] > n_video:
            temporal = torch.cat([temporal, vt[:, :, n_video:]], dim=2)
        temporal = rearrange(temporal, "(b s) h f e -> (b f) h s e", b=batch)
        out = torch.cat([spatial, temporal], dim=1)
        return self.proj(rearrange(out, "n h s e -> n s (h e)"))


class FinalLayer(nn.Module):
    """Linear decoder (§1.2): LN -> modulate(shift, scale from ``Linear(SiLU(c))``) -> ``Linear(d, p²·C_out)``; no gate.

    With ``conditioning="tokens"`` the LN has affine parameters and no modulation.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, conditioning: str = "adaln"):
        super().__init__()
        self.conditioning = conditioning
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=conditioning == "tokens", eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if conditioning == "adaln":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if self.conditioning == "adaln":
            shift, scale = _repeat_rows(self.adaLN_modulation(c), x.shape[0]).chunk(2, dim=-1)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))


# ----------------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------------
class LatteTransformer(nn.Module):
    """The Latte noise-prediction transformer over latent clips ``[B, F, C, H, W]`` (official key names, §1.10)."""

    def __init__(self, config: LatteConfig | dict):
        super().__init__()
        self.config = cfg = config if isinstance(config, LatteConfig) else LatteConfig(**config)
        d, p = cfg.hidden_size, cfg.patch_size
        self.in_channels, self.out_channels, self.patch_size = cfg.in_channels, cfg.out_channels, p
        self.tube = cfg.patch_embedding == "tube"
        if self.tube:
            self.x_embedder = TubeEmbed(p, cfg.tube_stride, cfg.in_channels, d)
        else:
            self.x_embedder = PatchEmbed(p, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        if cfg.condition == "class":
            self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        elif cfg.condition == "text":  # official ``extras == 78``: the flattened caption token states, added to t
            self.text_embedding_projection = nn.Sequential(
                nn.SiLU(), nn.Linear(cfg.text_tokens * cfg.text_dim, d, bias=True)
            )
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2, d), requires_grad=False)
        self.absolute_temporal = cfg.temporal_pos == "absolute"
        if self.absolute_temporal:
            self.temp_embed = nn.Parameter(torch.zeros(1, cfg.token_frames, d), requires_grad=False)
        rope = cfg.temporal_pos == "rope"
        heads, ratio, n = cfg.num_heads, cfg.mlp_ratio, cfg.depth
        if cfg.variant == 1:  # even blocks spatial, odd temporal
            blocks = [TransformerBlock(d, heads, ratio, cfg.conditioning, rope=rope and i % 2 == 1) for i in range(n)]
        elif cfg.variant == 2:  # first half spatial, second half temporal
            blocks = [TransformerBlock(d, heads, ratio, cfg.conditioning, rope=rope and i >= n // 2) for i in range(n)]
        elif cfg.variant == 3:
            blocks = [FactorizedBlock(d, heads, ratio, rope=rope) for _ in range(n // 2)]
        else:
            blocks = [
                TransformerBlock(d, heads, ratio, "adaln", attn=HeadSplitAttention(d, heads, rope=rope))
                for _ in range(n // 2)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(d, p, self.out_channels, cfg.conditioning)
        if self.tube:  # time x s after the linear decoder (§1.4); kernel = stride = (s, 1, 1) [unverified]
            s = cfg.tube_stride
            self.temporal_upsample = nn.ConvTranspose3d(self.out_channels, self.out_channels, (s, 1, 1), (s, 1, 1))
        self.initialize_weights()

    # -- §1.7 --------------------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Exactly the official initialisation: xavier Linears, zero biases, fixed sin-cos tables, N(0, 0.02)
        embeddings, and zero adaLN modulations and output linear (a fresh model predicts zeros)."""

        xavier_linears_(self)
        cfg = self.config
        self.pos_embed.data.copy_(sincos_2d(cfg.hidden_size, cfg.grid)[None])
        if self.absolute_temporal:
            self.temp_embed.data.copy_(sincos_1d(cfg.hidden_size, cfg.token_frames)[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if cfg.condition == "class":
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            if hasattr(block, "adaLN_modulation"):
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        if cfg.conditioning == "adaln":
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)
        if self.tube:
            w = self.temporal_upsample.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.constant_(self.temporal_upsample.bias, 0)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def spatial_block_indices(self) -> list[int]:
        """Indices of the blocks that mix within a frame only (V1: even, V2: first half; V3/V4: none pure)."""
        n = len(self.blocks)
        return {1: list(range(0, n, 2)), 2: list(range(n // 2))}.get(self.config.variant, [])

    def temporal_block_indices(self) -> list[int]:
        n = len(self.blocks)
        return {1: list(range(1, n, 2)), 2: list(range(n // 2, n))}.get(self.config.variant, [])

    def unpatchify(self, x: Tensor) -> Tensor:
        """``[N, S, p²·C] -> [N, C, H, W]`` (official ``nhwpqc -> nchpwq``)."""
        return unpatchify(x, self.config.grid, self.patch_size)

    def embed_conditions(
        self,
        t: Tensor,
        n_frames: int,
        use_image_num: int,
        y: Tensor | None = None,
        y_image: Tensor | None = None,
        text: Tensor | None = None,
        text_image: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-frame conditions ``[(B F'), ...]`` (video frames, then stills), the video condition ``[B, ...]`` and
        the final layer's per-frame condition.

        adaLN: vectors ``t_emb (+ y_emb | + proj(text))`` of width d; tokens: ``[t_emb, y_emb]`` stacked, ``[.., k, d]``.
        Text (official ``extras=78``): ``proj(SiLU(flatten(tokens)))``; the final layer sees ``t_emb`` alone (a label
        is seen by the final layer too).
        """
        cfg = self.config
        t_emb = self.t_embedder(t)
        extra = extra_img = None
        if cfg.condition == "class":
            if y is None:
                raise ValueError("this Latte is class-conditional: pass y (int64 [B]; -1 or K for the null class)")
            extra = self.y_embedder(y, self.training)
            if use_image_num:
                if y_image is None or tuple(y_image.shape) != (t.shape[0], use_image_num):
                    raise ValueError(f"use_image_num={use_image_num} needs y_image int64 [B, {use_image_num}]")
                extra_img = self.y_embedder(y_image, self.training)
        elif cfg.condition == "text":
            shape = (t.shape[0], cfg.text_tokens, cfg.text_dim)
            if text is None or tuple(text.shape) != shape:
                got = None if text is None else tuple(text.shape)
                raise ValueError(f"this Latte is text-conditional: pass text, the caption token states {list(shape)}, "
                                 f"got {got}")
            extra = self.text_embedding_projection(rearrange(text.to(t_emb.dtype), "b l d -> b (l d)"))
            if use_image_num:
                if text_image is None or tuple(text_image.shape) != (shape[0], use_image_num, *shape[1:]):
                    raise ValueError(f"use_image_num={use_image_num} needs text_image [B, {use_image_num}, "
                                     f"{cfg.text_tokens}, {cfg.text_dim}]")
                extra_img = self.text_embedding_projection(rearrange(text_image.to(t_emb.dtype), "b n l d -> b n (l d)"))
        t_img = repeat(t_emb, "b d -> b n d", n=use_image_num)
        if cfg.conditioning == "adaln":
            c = t_emb if extra is None else t_emb + extra
            frames = repeat(c, "b d -> b f d", f=n_frames)
            if use_image_num:
                frames = torch.cat([frames, t_img if extra_img is None else t_img + extra_img], dim=1)
            frames = rearrange(frames, "b f d -> (b f) d")
            final = frames
            if cfg.condition == "text":  # official extras=78: the final layer is modulated by the timestep alone
                final = repeat(t_emb, "b d -> (b f) d", f=n_frames + use_image_num)
            return frames, c, final
        c = t_emb[:, None] if extra is None else torch.stack([t_emb, extra], dim=1)
        frames = repeat(c, "b k d -> b f k d", f=n_frames)
        if use_image_num:
            img = t_img[:, :, None] if extra_img is None else torch.stack([t_img, extra_img], dim=2)
            frames = torch.cat([frames, img], dim=1)
        frames = rearrange(frames, "b f k d -> (b f) k d")
        return frames, c, frames

    def _temporal_video(self, x: Tensor, batch: int, n_video: int, fn, add_pos: bool) -> Tensor:
        """Run ``fn`` on the video frames in the temporal layout ``[(B S), F, d]``; stills pass unchanged."""
        if add_pos and self.absolute_temporal:
            return over_time(x, batch, n_video, lambda v: fn(v + self.temp_embed))
        return over_time(x, batch, n_video, fn)

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        y_image: Tensor | None = None,
        text: Tensor | None = None,
        text_image: Tensor | None = None,
        use_image_num: int = 0,
    ) -> Tensor:
        """``x [B, F + use_image_num, C, H, W]``, ``t [B]`` -> ``[B, F + use_image_num, C_out, H, W]``.

        y: class labels ``[B]`` (condition='class'); y_image: the stills' labels ``[B, N]``.
        text: caption token states ``[B, text_tokens, text_dim]`` (condition='text'); text_image: ``[B, N, L, D]``.
        """
        cfg = self.config
        _check_latents(cfg, x)
        batch, frames = x.shape[:2]
        n_img = int(use_image_num)
        n_video = frames - n_img
        if n_img and (self.tube or n_img < 0):
            raise ValueError("image-video joint training needs uniform patch embedding (a still is one frame)")
        if self.absolute_temporal and n_video != cfg.num_frames:
            raise ValueError(f"got {n_video} video frames, this Latte has temp_embed for num_frames={cfg.num_frames}")
        if self.tube and n_video % cfg.tube_stride:
            raise ValueError(f"{n_video} frames are not a multiple of tube_stride={cfg.tube_stride}")
        n_f = n_video // cfg.temporal_stride

        h = self.x_embedder(x) + self.pos_embed
        c_frames, c_video, c_final = self.embed_conditions(t, n_f, n_img, y, y_image, text, text_image)
        blocks = self.blocks
        if cfg.variant == 1:
            for i in range(0, len(blocks), 2):
                h = blocks[i](h, c_frames)
                h = self._temporal_video(h, batch, n_f, lambda v, blk=blocks[i + 1]: blk(v, c_video), add_pos=i == 0)
        elif cfg.variant == 2:
            half = len(blocks) // 2
            for blk in blocks[:half]:
                h = blk(h, c_frames)

            def temporal_half(v: Tensor) -> Tensor:  # one reshape between the halves (§1.3)
                for blk in blocks[half:]:
                    v = blk(v, c_video)
                return v

            h = self._temporal_video(h, batch, n_f, temporal_half, add_pos=True)
        elif cfg.variant == 3:
            for i, blk in enumerate(blocks):
                pos = self.temp_embed if (i == 0 and self.absolute_temporal) else None
                h = blk(h, c_frames, c_video, batch=batch, n_video=n_f, temp_pos=pos)
        else:
            if self.absolute_temporal:  # both head groups read the same input: temp_embed goes in before block 0
                h = self._temporal_video(h, batch, n_f, lambda v: v, add_pos=True)
            for blk in blocks:
                h = blk(h, c_frames, batch=batch, n_video=n_f)

        h = self.unpatchify(self.final_layer(h, c_final))
        out = rearrange(h, "(b f) c h w -> b f c h w", b=batch)
        if self.tube:
            out = rearrange(self.temporal_upsample(rearrange(out, "b f c h w -> b c f h w")), "b c f h w -> b f c h w")
        return out

    # -- checkpoints (§1.9, §1.10) -------------------------------------------------------------------------------
    def load_pretrained(self, source: str | os.PathLike | Mapping[str, Tensor], kind: str = "auto") -> KeyReport:
        """Load official Latte weights (``kind="latte"``: strict, every key and shape must match) or initialise from
        an ImageNet DiT (``kind="dit"``: copy equal names with equal shapes; ``temp_embed`` keeps its init, a label
        table of another class count is dropped). ``auto``: Latte when the weights have ``temp_embed``."""
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
        sd = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else _rename_legacy(dict(source))
        if kind == "auto":
            kind = "latte" if "temp_embed" in sd else "dit"
        _choice("init_kind", kind, ("latte", "dit"))
        own = self.state_dict()
        report = KeyReport.compare(sd, own, source=name, kind=kind, model="Latte")
        if kind == "latte":
            if report.missing or report.unexpected or report.mismatched:
                raise KeyError(
                    f"{name} does not match this Latte's official layout (strict load):\n{report.table()}\n"
                    "Check size/patch_size/num_classes/num_frames/condition against the checkpoint."
                )
            self.load_state_dict(sd, strict=True)
        else:
            if self.config.variant not in (1, 2):
                raise LatteConfigError(
                    f"DiT initialisation maps DiT blocks.{{i}} to Latte blocks.{{i}}; variant {self.config.variant} "
                    "has another block layout (use variant 1)"
                )
            self.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
        return report


# ----------------------------------------------------------------------------------------------------------------------
# The released Latte-1 T2V network (family='pixart'): PixArt-alpha blocks, diffusers ``LatteTransformer3DModel``
# ----------------------------------------------------------------------------------------------------------------------
class PixArtBlock(nn.Module):
    """A Latte-1 block, PixArt-alpha's adaLN-single (PixArt-alpha §2.3): ``x += g1·SA(LN(x)(1+s1)+b1)``; in spatial
    blocks ``x += CA(x, caption)`` (no norm, no gate); ``x += g2·MLP(LN(x)(1+s2)+b2)``.

    ``(b1, s1, g1, b2, s2, g2) = scale_shift_table + t_mod``: ``t_mod [rows, 6d]`` is ONE projection of the timestep
    shared by every block (``LattePixArtTransformer.t_block``); a block owns only its ``6 x d`` table. Temporal blocks
    (``cross_attention=False``) have no cross-attention. Rows of ``t_mod``/``context`` are shared by consecutive
    sequences as in ``TransformerBlock``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = True,
        norm_affine: bool = False,
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=norm_eps)
        self.attn = MultiHeadAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.cross_attn = (
            CrossAttention(hidden_size, hidden_size, num_heads, qkv_bias=qkv_bias) if cross_attention else None
        )
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t_mod: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        mods = rearrange(_repeat_rows(t_mod, x.shape[0]), "n (k d) -> n k d", k=6) + self.scale_shift_table
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("a spatial Latte-1 block cross-attends to the caption: pass context [B, L, d]")
            mask = None if context_mask is None else _repeat_rows(context_mask, x.shape[0])
            x = x + self.cross_attn(x, _repeat_rows(context, x.shape[0]).to(x.dtype), context_mask=mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class T2IFinalLayer(nn.Module):
    """PixArt-alpha's final layer: LN -> modulate(shift, scale = ``scale_shift_table + t_emb``, the embedded timestep
    alone) -> ``Linear(d, p²·C_out)``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        rows = rearrange(_repeat_rows(t_emb, x.shape[0]), "n d -> n 1 d")
        shift, scale = (rows + self.scale_shift_table).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LattePixArtTransformer(nn.Module):
    """The released Latte-1 T2V network (``family='pixart'``) over latent clips ``[B, F, C, H, W]``: interleaved
    spatial (self + cross-attention to the caption tokens) and temporal PixArt blocks, the math of diffusers'
    ``LatteTransformer3DModel`` (``to_diffusers``/``from_diffusers`` convert the weights, ``save_diffusers``/
    ``load_diffusers`` read and write its directory format).

    Blocks alternate as in variant 1: ``blocks[2i]`` spatial (diffusers ``transformer_blocks.i``), ``blocks[2i+1]``
    temporal (``temporal_transformer_blocks.i``). ``temp_embed`` enters before the first temporal block when there
    is more than one frame; the 2D table follows diffusers (laid out for ``sample_size``, interpolation scale
    ``max(sample_size // 64, 1)``). Both tables are fixed and not saved (as in diffusers).
    Image-video joint training (§1.8, official ``latte_t2v.py``): stills follow the video frames, each with its own
    caption, and skip the temporal blocks; ``temp_embed`` is added to the video frames [our choice where the official
    code differs between its two code paths].
    """

    def __init__(self, config: LatteConfig | dict):
        super().__init__()
        self.config = cfg = config if isinstance(config, LatteConfig) else LatteConfig(**config)
        if cfg.family != "pixart":
            raise LatteConfigError(f"LattePixArtTransformer needs family='pixart', got {cfg.family!r}")
        d, p = cfg.hidden_size, cfg.patch_size
        self.in_channels, self.out_channels, self.patch_size = cfg.in_channels, cfg.out_channels, p
        self.x_embedder = PatchEmbed(p, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))  # adaLN-single: one projection
        self.caption_projection = Mlp(cfg.text_dim, d, d, act="gelu_tanh")
        base = cfg.sample_size or cfg.input_size
        pos = sincos_2d(d, cfg.grid, scale=max(base // 64, 1), base_size=base // p)
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.register_buffer("temp_embed", sincos_1d(d, cfg.num_frames)[None], persistent=False)
        self.blocks = nn.ModuleList([
            PixArtBlock(d, cfg.num_heads, cfg.mlp_ratio, cross_attention=i % 2 == 0, norm_affine=cfg.norm_affine,
                        norm_eps=cfg.norm_eps, qkv_bias=cfg.attention_bias)
            for i in range(cfg.depth)
        ])
        self.final_layer = T2IFinalLayer(d, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt-alpha's initialisation: xavier Linears with zero biases, the patch conv as a Linear, N(0, 0.02) for
        the timestep MLP, ``t_block`` and the caption projection, zero cross-attention outputs and final linear (a
        fresh model predicts zeros); the scale-shift tables keep N(0, 1/d)."""

        xavier_linears_(self)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.caption_projection.fc1,
                    self.caption_projection.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.constant_(block.cross_attn.proj.weight, 0)
                nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def spatial_block_indices(self) -> list[int]:
        return list(range(0, len(self.blocks), 2))

    def temporal_block_indices(self) -> list[int]:
        return list(range(1, len(self.blocks), 2))

    def caption_context(
        self, text: Tensor, text_mask: Tensor | None, text_image: Tensor | None, text_image_mask: Tensor | None,
        n_video: int, n_img: int,
    ) -> tuple[Tensor, Tensor | None]:
        """Projected caption tokens for the spatial blocks: ``[B, L, d]`` (shared by the frames of a clip), or
        ``[(B F'), L, d]`` with stills, each still with its own caption; the key mask alike (None = every token)."""
        batch, length = text.shape[:2]
        context = self.caption_projection(text)
        if not n_img:
            return context, text_mask
        if text_image is None or tuple(text_image.shape[:3]) != (batch, n_img, length):
            raise ValueError(f"use_image_num={n_img} needs text_image [B, {n_img}, {length}, D] (the stills' captions)")
        frames = torch.cat([repeat(context, "b l d -> b f l d", f=n_video), self.caption_projection(text_image)], dim=1)
        mask = None
        if text_mask is not None or text_image_mask is not None:
            ones = torch.ones(batch, length, dtype=torch.bool, device=text.device)
            video = text_mask.bool() if text_mask is not None else ones
            stills = text_image_mask.bool() if text_image_mask is not None else repeat(ones, "b l -> b n l", n=n_img)
            mask = rearrange(torch.cat([repeat(video, "b l -> b f l", f=n_video), stills], dim=1), "b f l -> (b f) l")
        return rearrange(frames, "b f l d -> (b f) l d"), mask

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        text_image: Tensor | None = None,
        text_image_mask: Tensor | None = None,
        use_image_num: int = 0,
        temporal: bool = True,
    ) -> Tensor:
        """``x [B, F + use_image_num, C, H, W]``, ``t [B]`` -> ``[B, F + use_image_num, C_out, H, W]``.

        text: caption token states ``[B, L, text_dim]`` (T5 for Latte-1); text_mask: bool ``[B, L]`` (True = real
        token; None attends to every token, as diffusers' pipeline does); text_image/text_image_mask: the stills'
        captions ``[B, N, L, text_dim]`` / ``[B, N, L]``. temporal=False skips the temporal blocks (diffusers
        ``enable_temporal_attentions``; image generation).
        """
        cfg = self.config
        _check_latents(cfg, x)
        if text is None or text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"Latte-1 cross-attends to caption token states: pass text [B, L, {cfg.text_dim}], got {got}")
        batch, frames = x.shape[:2]
        n_img = int(use_image_num)
        n_video = frames - n_img
        if n_img < 0 or n_video < 1:
            raise ValueError(f"use_image_num={n_img} leaves {n_video} video frames")
        add_temp = temporal and n_video > 1
        if add_temp and n_video != cfg.num_frames:
            raise ValueError(f"got {n_video} video frames, this Latte has temp_embed for num_frames={cfg.num_frames}")

        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        t_emb = self.t_embedder(t)
        t_mod = self.t_block(t_emb)
        context, mask = self.caption_context(text, text_mask, text_image, text_image_mask, n_video, n_img)
        for i in range(0, len(self.blocks), 2):
            h = self.blocks[i](h, t_mod, context, mask)
            if temporal:
                pos = self.temp_embed.to(h.dtype) if (i == 0 and add_temp) else None
                h = over_time(h, batch, n_video,
                              lambda v, blk=self.blocks[i + 1], pos=pos: blk(v if pos is None else v + pos, t_mod))
        h = unpatchify(self.final_layer(h, t_emb), cfg.grid, self.patch_size)
        return rearrange(h, "(b f) c h w -> b f c h w", b=batch)

    # -- checkpoints: diffusers' directory format and our own names ---------------------------------------------------
    def to_diffusers(self, state_dict: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Our weights (``state_dict`` or this model's) under diffusers ``LatteTransformer3DModel`` names."""
        return to_diffusers_state_dict(self.state_dict() if state_dict is None else state_dict)

    def from_diffusers(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """diffusers weights under our names (q/k/v concatenated); keys diffusers lacks stay absent (KeyReport
        reports them), diffusers keys we do not use are returned under their own name (reported as unexpected)."""
        out, used = {}, set()
        for key in self.state_dict():
            names = _diffusers_names(key)
            if all(n in state_dict for n in names):
                out[key] = torch.cat([state_dict[n] for n in names], dim=0) if len(names) > 1 else state_dict[names[0]]
                used.update(names)
        out.update({k: v for k, v in state_dict.items() if k not in used})
        return out

    def load_pretrained(self, source: str | os.PathLike | Mapping[str, Tensor], kind: str = "auto") -> KeyReport:
        """Strictly load Latte-1 weights: ``kind="diffusers"`` (a diffusers directory, ``<dir>/transformer`` or
        flat, or a state dict with diffusers names) or ``kind="latte"`` (our names: a Lightning checkpoint of this
        module or a raw state dict). ``auto``: diffusers for a directory or diffusers names. Every key and shape must
        match; the directory's config.json must describe this network."""
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            config, sd = read_diffusers(source)
            check_diffusers_config(config, self.config, name)
            kind = "diffusers" if kind == "auto" else kind
        else:
            sd = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else dict(source)
            if kind == "auto":
                kind = "diffusers" if any(k.startswith("transformer_blocks.") for k in sd) else "latte"
        _choice("init_kind", kind, ("latte", "diffusers"))
        if kind == "diffusers":
            sd = self.from_diffusers(sd)
        report = KeyReport.compare(sd, self.state_dict(), source=name, kind=kind, model="Latte-1 (family=pixart)")
        if not report.exact:
            raise KeyError(
                f"{name} does not match this Latte-1 network (strict load):\n{report.table()}\n"
                "Check depth/hidden_size/num_heads/patch_size and the text encoder width against the checkpoint."
            )
        self.load_state_dict(sd, strict=True)
        return report

    def save_diffusers(self, directory: str | os.PathLike, state_dict: Mapping[str, Tensor] | None = None) -> str:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers'
        ``LatteTransformer3DModel.from_pretrained(directory)`` loads; returns the directory."""
        return write_diffusers(directory, self.config, self.state_dict() if state_dict is None else state_dict)


# ----------------------------------------------------------------------------------------------------------------------
# diffusers ``LatteTransformer3DModel`` format (config.json + safetensors) for the PixArt family
# ----------------------------------------------------------------------------------------------------------------------
DIFFUSERS_CLASS = "LatteTransformer3DModel"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# our key tail -> diffusers key tails (several = concatenated along dim 0, e.g. fused qkv <- to_q, to_k, to_v)
_DIFFUSERS_TOP = {
    "x_embedder.proj": ("pos_embed.proj",),
    "t_embedder.mlp.0": ("adaln_single.emb.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("adaln_single.emb.timestep_embedder.linear_2",),
    "t_block.1": ("adaln_single.linear",),
    "caption_projection.fc1": ("caption_projection.linear_1",),
    "caption_projection.fc2": ("caption_projection.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.scale_shift_table": ("scale_shift_table",),
}
_DIFFUSERS_BLOCK = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "norm1": ("norm1",),
    "norm2": ("norm2",),
    "scale_shift_table": ("scale_shift_table",),
}


def _diffusers_names(key: str) -> tuple[str, ...]:
    """diffusers name(s) of one of our PixArt-family keys (``blocks.2i`` -> ``transformer_blocks.i``,
    ``blocks.2i+1`` -> ``temporal_transformer_blocks.i``)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+?)(\.weight|\.bias|)", key)
    if m:
        i, tail, leaf = int(m.group(1)), m.group(2), m.group(3)
        table, prefix = _DIFFUSERS_BLOCK, f"{'temporal_transformer_blocks' if i % 2 else 'transformer_blocks'}.{i // 2}."
    else:
        m = re.fullmatch(r"(.+?)(\.weight|\.bias|)", key)
        tail, leaf, table, prefix = m.group(1), m.group(2), _DIFFUSERS_TOP, ""
    if tail not in table:
        raise KeyError(f"no diffusers name for Latte-1 key {key!r}")
    return tuple(prefix + name + leaf for name in table[tail])


def to_diffusers_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """PixArt-family weights under our names -> diffusers ``LatteTransformer3DModel`` names (fused qkv split)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        names = _diffusers_names(key)
        for name, part in zip(names, value.chunk(len(names), dim=0)):
            out[name] = part.detach().cpu().contiguous().clone()
    return out


def write_diffusers(directory: str | os.PathLike, cfg: LatteConfig, state_dict: Mapping[str, Tensor]) -> str:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` of a PixArt-family network (our key names in
    ``state_dict``) that diffusers' ``LatteTransformer3DModel.from_pretrained(directory)`` loads."""
    from safetensors.torch import save_file

    config = diffusers_config(cfg)
    weights = to_diffusers_state_dict(state_dict)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(weights, os.path.join(directory, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return os.fspath(directory)


def export_diffusers(checkpoint: str | os.PathLike, directory: str | os.PathLike, ema: bool = True) -> str:
    """A Lightning checkpoint of a family-'pixart' ``Latte`` run -> a diffusers ``LatteTransformer3DModel``
    directory (EMA weights when the run has them and ``ema``), without building the model or its text encoder."""
    ckpt = safe_load(checkpoint)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("latte_config"), Mapping):
        raise ValueError(f"{checkpoint} has no 'latte_config' (not a Latte run checkpoint, or one saved before it was "
                         "recorded); build the module and call Latte.export_diffusers(directory)")
    cfg = LatteConfig(**ckpt["latte_config"])
    has_ema = any(k.startswith(EMA_PREFIX) for k in ckpt.get("state_dict", {}))
    sd = ema_state_dict(ckpt) if ema and has_ema else raw_state_dict(ckpt)
    return write_diffusers(directory, cfg, {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})


def diffusers_config(cfg: LatteConfig) -> dict[str, Any]:
    """The ``LatteTransformer3DModel`` config.json of a PixArt-family ``LatteConfig``."""
    if cfg.family != "pixart":
        raise LatteConfigError("only family='pixart' (Latte-1) has a diffusers LatteTransformer3DModel format")
    return {
        "_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.30.0",
        "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth // 2,
        "dropout": 0.0, "cross_attention_dim": cfg.hidden_size, "attention_bias": cfg.attention_bias,
        "sample_size": cfg.sample_size or cfg.input_size, "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": cfg.norm_affine, "norm_eps": cfg.norm_eps, "caption_channels": cfg.text_dim,
        "video_length": cfg.num_frames,
    }


def latte_kwargs_from_diffusers(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """``LatteConfig`` fields (family='pixart') from a ``LatteTransformer3DModel`` config.json; a setting this
    network does not implement is an error naming it."""
    c = dict(config)
    want = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate"}
    for key, value in want.items():
        if c.get(key, value) != value:
            raise LatteConfigError(f"{source}: {key}={c[key]!r} is not implemented for Latte-1 (needs {value!r})")
    if float(c.get("dropout", 0.0) or 0.0) != 0.0:
        raise LatteConfigError(f"{source}: dropout={c['dropout']} is not implemented (Latte-1 uses 0.0)")
    heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    d = heads * head_dim
    if c.get("cross_attention_dim") not in (None, d):
        raise LatteConfigError(f"{source}: cross_attention_dim={c['cross_attention_dim']} must equal the width {d}")
    in_ch = int(c["in_channels"])
    out_ch = int(c.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise LatteConfigError(f"{source}: out_channels={out_ch} must be in_channels or 2 x in_channels (learned sigma)")
    return dict(
        family="pixart", condition="text", input_size=int(c["sample_size"]), sample_size=int(c["sample_size"]),
        patch_size=int(c["patch_size"]), in_channels=in_ch, hidden_size=d, depth=2 * int(c["num_layers"]),
        num_heads=heads, num_frames=int(c.get("video_length", 16)), text_dim=int(c["caption_channels"]),
        norm_affine=bool(c.get("norm_elementwise_affine", True)), norm_eps=float(c.get("norm_eps", 1e-5)),
        attention_bias=bool(c.get("attention_bias", False)), learn_sigma=out_ch == 2 * in_ch,
    )


def check_diffusers_config(config: Mapping[str, Any], cfg: LatteConfig, source: str) -> None:
    """Raise naming every structural field where ``config`` (config.json) and ``cfg`` differ (the clip size, frame
    count and layout size may differ: the fixed tables are recomputed)."""
    theirs = latte_kwargs_from_diffusers(config, source)
    free = ("input_size", "num_frames", "sample_size")
    diff = [f"{k}: checkpoint {v!r}, model {getattr(cfg, k)!r}" for k, v in theirs.items()
            if k not in free and getattr(cfg, k) != v]
    if diff:
        raise LatteConfigError(f"{source}/config.json does not describe this Latte-1 network: " + "; ".join(diff))


def diffusers_dir(path: str | os.PathLike) -> str:
    """The transformer directory of a diffusers pipeline (``<path>/transformer``) or ``path`` itself."""
    path = os.fspath(path)
    for candidate in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(f"{path!r} holds no diffusers config.json (nor transformer/config.json); give the local "
                            "Latte-1 directory (huggingface maxin-cn/Latte-1, downloaded beforehand)")


def read_diffusers(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json, weights)`` of a local diffusers transformer directory (single or sharded safetensors, .bin)."""
    folder = diffusers_dir(path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if config.get("_class_name") not in (None, DIFFUSERS_CLASS, "LatteT2V"):
        raise LatteConfigError(f"{folder}/config.json is a {config['_class_name']}, not a {DIFFUSERS_CLASS}")
    for name in _DIFFUSERS_WEIGHTS:
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):  # sharded: {"weight_map": {key: file}}
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for shard in files:
                sd.update(read_state_dict(os.path.join(folder, shard)))
            return config, sd
        if os.path.isfile(os.path.join(folder, name)):
            return config, read_state_dict(os.path.join(folder, name))
    raise FileNotFoundError(f"{folder} has config.json but no {' or '.join(_DIFFUSERS_WEIGHTS)} (or a sharded index)")


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint reading and the key report
# ----------------------------------------------------------------------------------------------------------------------
_LEGACY = (("time_embed", "temp_embed"),)  # older Latte checkpoints [code: deleted trans_weight.py]


def _rename_legacy(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    for old, new in _LEGACY:
        if old in sd and new not in sd:
            sd[new] = sd.pop(old)
    return sd


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Network weights from an official Latte file (``ema`` preferred, else ``model``), a raw DiT/Latte state dict,
    or one of our Lightning checkpoints (EMA weights when present, ``model.`` prefix removed)."""
    sd = read_state_dict(path)
    if any(k.startswith("model.") for k in sd):  # a Lightning checkpoint of this module
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return _rename_legacy(sd)


# ----------------------------------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------------------------------
def _frozen_state_dict_hook(module: Latte, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if any(k.startswith(prefix + p) for p in module.frozen_prefixes)]:
        del state_dict[key]


def _frozen_load_hook(module: Latte, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not any(k.startswith(p) or f".{p}" in k for p in module.frozen_prefixes)]


class Latte(L.LightningModule):
    """Latte training (L_simple + L_vlb, §2), sampling (DDPM-250 / DDIM, CFG) and checkpoint import.

    Args:
        size, patch_size: Latte-S/B/L/XL with p = 2/4/8 (``LATTE_SIZES``); ``depth``/``hidden_size``/``num_heads``
            override the size (tiny models).
        family: 'dit' (the paper's adaLN-Zero blocks, everything below) or 'pixart' (the released Latte-1 T2V:
            adaLN-single + cross-attention to the caption tokens, ``LattePixArtTransformer``). With 'pixart' and
            ``init_from`` a diffusers directory, its config.json gives the network's shape (size, patch_size, depth,
            hidden_size, num_heads, learn_sigma must agree when set).
        variant (1-4), patch_embedding ('uniform'|'tube', ``tube_stride``), conditioning ('adaln'|'tokens'),
            condition ('class'|'text'|'none'), temporal_pos ('absolute'|'rope'): §1.3-§1.6.
        num_classes, class_dropout_prob: class conditioning (UCF-101: 101, 0.1); the dropout also drops captions.
        num_frames, resolution: the pixel clip (linked from the data config); latent sizes come from the VAE.
        use_image_num: stills per clip for image-video joint training (§1.8); 0 = video only.
        vae: ``VAEConfig`` fields (kind diffusers|tokenizer|pixels, path, scale_factor, ...).
        text_encoder: ``TextEncoderConfig`` fields for condition='text' (default: open_clip, random tiny tower when
            no checkpoint is given). Its token states condition the model: flattened (dit, official ``extras=78``:
            CLIP ViT-L/14, 77 x 768) or cross-attended (pixart: T5-XXL, 120 x 4096).
        text_padding: pixart only: 'mask' (padded caption tokens are masked out of the cross-attention, as the
            official LatteT2V training and diffusers' single-prompt pipeline) or 'zero' (padded token states zeroed
            and attended, as diffusers' pipeline does for a batch of prompts).
        diffusion: extra ``DiffusionConfig`` fields; sampler/sample_steps/cfg_scale: generation (DDPM 250, CFG 1).
        lr, weight_decay, betas: AdamW (official: 1e-4, 0, constant).
        grad_clip_norm, grad_clip_start_step: clip at max-norm from this optimizer step on (official: 0.1 from
            ``start_clip_iter``); the norm is logged every step.
        init_from, init_kind: official Latte checkpoint ('latte', strict) or ImageNet DiT ('dit') to start from;
            family 'pixart': a local diffusers directory of Latte-1 ('diffusers', strict; ``<dir>`` or
            ``<dir>/transformer``) or our own checkpoint ('latte'). 'auto' picks by the source.
        num_samples: how many videos ``generate()`` makes without a batch (predict files: ``PredictionWriter``).
    """

    fsdp_block_classes = (TransformerBlock, FactorizedBlock, PixArtBlock)

    def __init__(
        self,
        size: Literal["S", "B", "L", "XL"] = "XL",
        patch_size: Literal[2, 4, 8] = 2,
        family: Literal["dit", "pixart"] = "dit",
        variant: Literal[1, 2, 3, 4] = 1,
        patch_embedding: Literal["uniform", "tube"] = "uniform",
        tube_stride: int = 2,
        conditioning: Literal["adaln", "tokens"] = "adaln",
        condition: Literal["class", "text", "none"] = "class",
        num_classes: int = 101,
        class_dropout_prob: float = 0.1,
        temporal_pos: Literal["absolute", "rope"] = "absolute",
        num_frames: int = 16,
        resolution: int | list[int] = 256,
        learn_sigma: bool = True,
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        use_image_num: int = 0,
        vae: dict | None = None,
        text_encoder: dict | None = None,
        text_padding: Literal["mask", "zero"] = "mask",
        diffusion: dict | None = None,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        sample_steps: int | str = 250,
        cfg_scale: float = 1.0,
        num_samples: int = 4,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip_norm: float | None = 0.1,
        grad_clip_start_step: int = 0,
        init_from: str | None = None,
        init_kind: Literal["auto", "latte", "dit", "diffusers"] = "auto",
    ):
        super().__init__()
        self.save_hyperparameters()
        args = dict(self.hparams)
        self.validate_config(args)
        self.vae = latent_autoencoder(vae)
        h_px = _square(resolution)
        c, t, h, w = self.vae.latent_shape(num_frames, h_px, h_px)
        if use_image_num and self.vae.temporal_factor != 1:
            raise LatteConfigError(
                f"use_image_num needs a per-frame VAE (latent frame = video frame); this one compresses time by "
                f"{self.vae.temporal_factor}"
            )
        self.text_encoder = build_text_encoder(text_encoder or {}) if condition == "text" else None
        net = _network_kwargs(args)
        net.update(input_size=h, num_frames=t, in_channels=c)
        if self.text_encoder is not None:  # its token states: [max_length, token_dim] per caption
            width = self.text_encoder.token_dim
            if family == "pixart" and net.get("text_dim") not in (None, width):
                raise LatteConfigError(
                    f"the Latte-1 checkpoint {init_from!r} projects {net['text_dim']}-d caption tokens but the text "
                    f"encoder gives {width}-d ones: use its text encoder (T5 v1.1 XXL, 4096-d)"
                )
            net.update(text_tokens=self.text_encoder.max_length, text_dim=width)
        try:
            self.config = LatteConfig(**net)
        except LatteConfigError as e:
            raise LatteConfigError(
                f"{e} (latents: {c} x {t} x {h} x {w} from num_frames={num_frames}, resolution={resolution} through "
                f"the {self.vae.kind} VAE, spatial factor {self.vae.spatial_factor})"
            ) from None
        self.model = LattePixArtTransformer(self.config) if family == "pixart" else LatteTransformer(self.config)
        self.diffusion = create_diffusion(
            DiffusionConfig(**{"channel_dim": 2, "learn_sigma": learn_sigma, "sampler": sampler,
                               "sample_steps": sample_steps, **(diffusion or {})})
        )
        # frozen pretrained nets loaded from config paths stay out of checkpoints (reloaded from their path)
        self.frozen_prefixes = tuple(
            f"{name}." for name in ("vae", "text_encoder") if getattr(getattr(self, name), "from_file", False)
        )
        self.register_state_dict_post_hook(_frozen_state_dict_hook)
        self.register_load_state_dict_post_hook(_frozen_load_hook)
        self.use_image_num, self.cfg_scale, self.num_samples = use_image_num, cfg_scale, num_samples
        self.sampler, self.sample_steps = sampler, sample_steps
        self.load_report: KeyReport | None = None
        if init_from:
            self.load_report = self.model.load_pretrained(init_from, init_kind)
            print(self.load_report.table(), flush=True)

    # -- config validation (also called by the CLI before anything is built) -------------------------------------
    @classmethod
    def validate_config(cls, args: Mapping[str, Any]) -> None:
        """Raise ``LatteConfigError`` naming the setting and the fix; reads no weights (checks that paths exist)."""
        a = {**_DEFAULTS, **dict(args)}
        _choice("size", a["size"], tuple(LATTE_SIZES))
        _choice("patch_size", a["patch_size"], (2, 4, 8))
        _choice("sampler", a["sampler"], ("ddpm", "ddim"))
        _choice("family", a["family"], FAMILIES)
        _choice("init_kind", a["init_kind"], ("auto", "latte", "dit", "diffusers"))
        _choice("text_padding", a["text_padding"], ("mask", "zero"))
        if a["init_from"] and not os.path.exists(a["init_from"]):
            raise LatteConfigError(f"init_from {a['init_from']!r} does not exist")
        if a["init_kind"] == "diffusers" and a["family"] != "pixart":
            raise LatteConfigError("init_kind='diffusers' loads the released Latte-1 (LatteTransformer3DModel): set "
                                   "family: pixart")
        if a["init_kind"] == "dit" and a["family"] != "dit":
            raise LatteConfigError("init_kind='dit' initialises the paper's family from an ImageNet DiT: set family: dit")
        probe = _network_kwargs(a)  # latent sizes are known once the VAE is loaded; probe the structural rules
        probe.update(input_size=probe["patch_size"], num_frames=a["tube_stride"], in_channels=4, sample_size=None)
        LatteConfig(**probe)
        try:
            factor = spatial_factor_of(VAEConfig.coerce(a["vae"]))
        except (ValueError, TypeError):  # a bad vae setting: reported below
            factor = None
        if factor:
            res = _square(a["resolution"])
            if res % factor:
                raise LatteConfigError(f"resolution={res} is not a multiple of the VAE's spatial factor {factor}")
            try:
                LatteConfig(**{**probe, "input_size": res // factor})
            except LatteConfigError as e:
                raise LatteConfigError(f"{e} (latent size {res // factor} = resolution {res} / VAE spatial factor "
                                       f"{factor}); pick a resolution whose latent size is a multiple of the patch size") from None
        if a["condition"] == "none" and a["cfg_scale"] != 1.0:
            raise LatteConfigError("cfg_scale != 1 needs a condition; an unconditional Latte samples with cfg_scale 1")
        if a["condition"] == "class" and a["cfg_scale"] != 1.0 and a["class_dropout_prob"] <= 0:
            raise LatteConfigError("cfg_scale != 1 needs the null class: set class_dropout_prob > 0 (official 0.1)")
        if not isinstance(a["use_image_num"], int) or a["use_image_num"] < 0:
            raise LatteConfigError(f"use_image_num must be an integer >= 0, got {a['use_image_num']!r}")
        if a["use_image_num"] and a["patch_embedding"] == "tube":
            raise LatteConfigError("use_image_num > 0 needs patch_embedding='uniform' (a still cannot form a tube)")
        if a["num_frames"] < 1:
            raise LatteConfigError(f"num_frames must be >= 1, got {a['num_frames']}")
        _square(a["resolution"])
        try:
            VAEConfig.coerce(a["vae"]).validate()
            if a["condition"] == "text":
                TextEncoderConfig(**(a["text_encoder"] or {})).validate()
            DiffusionConfig(**{"channel_dim": 2, "learn_sigma": a["learn_sigma"], "sampler": a["sampler"],
                               "sample_steps": a["sample_steps"], **(a["diffusion"] or {})})
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise LatteConfigError(str(e)) from None
        if a["init_from"] and os.path.isdir(a["init_from"]) and a["family"] != "pixart":
            raise LatteConfigError(f"init_from {a['init_from']!r} is a directory (diffusers format): that is the "
                                   "released Latte-1, set family: pixart; the paper's family loads a checkpoint file")

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # the official recipe trains in fp32 with TF32 matmuls (§1.11)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def export_diffusers(self, directory: str | os.PathLike, ema: bool = True) -> str:
        """Write the Latte-1 network (family 'pixart') as a diffusers ``LatteTransformer3DModel`` directory
        (config.json + diffusion_pytorch_model.safetensors), with the EMA weights when this module holds them."""
        if self.config.family != "pixart":
            raise LatteConfigError("export_diffusers writes diffusers' LatteTransformer3DModel, i.e. family='pixart'")
        sd = self.state_dict()
        if ema and any(k.startswith(EMA_PREFIX) for k in sd):
            sd = ema_state_dict(sd)
        return self.model.save_diffusers(directory, {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the network's config: ``export_diffusers(checkpoint, directory)`` rebuilds nothing else."""
        checkpoint["latte_config"] = asdict(self.config)

    # -- data ------------------------------------------------------------------------------------------------------
    def latents(self, batch: Mapping[str, Any]) -> Tensor:
        """Scaled latent clips ``[B, F, C, h, w]``: ``batch["latents"]`` (cached raw VAE latents ``[B, C, T, h, w]``,
        as ``vidgen tokenize`` writes them; ``vae.scale_factor`` is applied here) or the VAE encoding of the video."""
        if batch.get("latents") is not None:
            z = batch["latents"].to(self.device, torch.float32) * self.vae.scale_factor
        else:
            z = self.vae.encode(batch["video"].to(self.device))
        z = rearrange(z, "b c f h w -> b f c h w")
        cfg = self.config
        want = (cfg.num_frames, cfg.in_channels, cfg.input_size, cfg.input_size)
        if tuple(z.shape[1:]) != want:
            raise ValueError(
                f"latents of shape [F, C, h, w] = {list(z.shape[1:])} but the model is built for {list(want)}: make "
                "data num_frames/resolution match the model (they are linked in the CLI) and the VAE the one the "
                "cached latents came from"
            )
        return z

    def _captions(self, texts: list[str], drop: bool) -> dict[str, Tensor]:
        """Model kwargs of captions: ``text`` = the encoder's token states ``[B, L, D]`` (dropped captions -> "" for
        classifier-free guidance); family pixart adds ``text_mask`` (text_padding='mask') or zeroes the padded
        token states (text_padding='zero')."""
        if drop and self.config.class_dropout_prob > 0:
            keep = torch.rand(len(texts)) >= self.config.class_dropout_prob
            texts = [s if k else "" for s, k in zip(texts, keep.tolist())]
        enc = self.text_encoder(texts)
        tokens, mask = enc.tokens.to(self.device), enc.mask.to(self.device)
        if self.config.family != "pixart":
            return {"text": tokens}
        if self.hparams.text_padding == "zero":
            return {"text": tokens * mask[..., None].to(tokens.dtype)}
        return {"text": tokens, "text_mask": mask}

    def model_inputs(self, batch: Mapping[str, Any], train: bool) -> tuple[Tensor, dict[str, Any]]:
        """``(x0 [B, F + N, C, h, w], model kwargs)`` for a batch; stills drawn in training when ``use_image_num``."""
        z = self.latents(batch)
        b, f = z.shape[:2]
        n = self.use_image_num if train else 0
        kwargs: dict[str, Any] = {"use_image_num": n}
        if n:
            # [our choice] stills from other clips of the batch (the clip itself when B = 1), with their labels
            other = torch.randint(1, b, (b, n), device=z.device) if b > 1 else torch.zeros(b, n, dtype=torch.long,
                                                                                           device=z.device)
            clip = (torch.arange(b, device=z.device)[:, None] + other) % b
            frame = torch.randint(0, f, (b, n), device=z.device)
            z = torch.cat([z, z[clip, frame]], dim=1)
        cond = self.config.condition
        if cond == "class":
            if "label" not in batch:
                raise ValueError("condition='class' needs batch['label'] (int64 [B], -1 = none)")
            y = batch["label"].to(self.device).long()
            k = self.config.num_classes
            if bool(((y >= k) | ((y < 0) & (self.config.class_dropout_prob <= 0))).any()):
                raise ValueError(f"labels {y.tolist()} out of range for num_classes={k} (-1 = absent needs "
                                 "class_dropout_prob > 0 for the null class)")
            kwargs["y"] = y
            if n:
                kwargs["y_image"] = y[clip]
        elif cond == "text":
            texts = list(batch.get("text") or [])
            if len(texts) != b:
                raise ValueError(f"condition='text' needs batch['text'] with {b} captions, got {len(texts)}")
            kwargs.update(self._captions(texts, drop=train))
            if n:
                flat = self._captions([texts[i] for i in clip.flatten().tolist()], drop=train)
                kwargs["text_image"] = rearrange(flat["text"], "(b n) l d -> b n l d", b=b)
                if "text_mask" in flat:
                    kwargs["text_image_mask"] = rearrange(flat["text_mask"], "(b n) l -> b n l", b=b)
        return z, kwargs

    # -- training ----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return self.model(x, t, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, kwargs = self.model_inputs(batch, train=True)
        terms = self.diffusion.training_losses(self.model, x0, kwargs)
        loss = terms["loss"].mean()
        b = x0.shape[0]
        log_step(self, {"train/loss": loss, "train/mse": terms["mse"].mean(),
                        **({"train/vb": terms["vb"].mean()} if "vb" in terms else {})}, b)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch, n = eval_rows(batch)  # DDP padding dropped (all padding: one row logged with weight 0)
        x0, kwargs = self.model_inputs(batch, train=False)
        g = torch.Generator().manual_seed(1000 + batch_idx)  # the same t and noise at every validation
        terms = self.diffusion.training_losses(self.model, x0, kwargs, generator=g)
        loss = terms["loss"].mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/mse", terms["mse"].mean(), sync_dist=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        hp = self.hparams
        return cpu_multi_tensor(torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas)))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Log the gradient norm every step; clip at ``grad_clip_norm`` from ``grad_clip_start_step`` on (§1.11)."""
        if gradient_clip_val is not None:
            raise LatteConfigError("Latte clips gradients itself: set model grad_clip_norm / grad_clip_start_step, "
                                   "not trainer.gradient_clip_val")
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        max_norm = self.hparams.grad_clip_norm
        if max_norm is not None and self.global_step >= self.hparams.grad_clip_start_step:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        log_step(self, {"train/grad_norm": norm}, 1)

    # -- sampling ----------------------------------------------------------------------------------------------------
    def sampling_kwargs(self, batch: Mapping[str, Any] | None, n: int, generator: torch.Generator | None):
        """Conditional and null model kwargs for ``n`` samples (labels/captions from the batch, else random labels)."""
        cond = self.config.condition
        if cond == "class":
            k = self.config.num_classes
            gen_device = generator.device if generator is not None else "cpu"
            y = torch.randint(0, k, (n,), generator=generator, device=gen_device).to(self.device)
            if batch is not None and batch.get("label") is not None:  # given labels; absent ones (-1) random
                given = batch["label"][:n].to(self.device).long()
                y[: len(given)] = torch.where(given >= 0, given, y[: len(given)])
            null = torch.full_like(y, k)
            return {"y": y}, {"y": null}
        if cond == "text":
            texts = list((batch or {}).get("text") or [])[:n]
            if len(texts) != n:
                raise ValueError(f"a text-conditional Latte samples from captions: pass batch['text'] with {n} strings")
            return self._captions(texts, drop=False), self._captions([""] * n, drop=False)
        return {}, {}

    @torch.no_grad()
    def generate(
        self, batch: dict | None = None, num_samples: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Sample videos ``[B, C, T, H, W]`` in [-1, 1]: DDPM/DDIM with CFG over latents, decoded by the VAE."""
        if num_samples is None:
            if batch is not None:
                for key in ("label", "text", "video", "latents"):
                    if batch.get(key) is not None:
                        num_samples = len(batch[key])
                        break
            num_samples = num_samples or self.num_samples
        cfg = self.config
        kwargs, uncond = self.sampling_kwargs(batch, num_samples, generator)
        shape = (num_samples, cfg.num_frames, cfg.in_channels, cfg.input_size, cfg.input_size)
        was_training = self.model.training
        self.model.eval()  # no label dropout while sampling
        try:
            z = self.diffusion.sample(
                self.model, shape, sampler=self.sampler, steps=self.sample_steps, cfg_scale=self.cfg_scale,
                generator=generator, model_kwargs=kwargs, uncond_kwargs=uncond if self.cfg_scale != 1.0 else None,
                device=self.device,
            )
        finally:
            self.model.train(was_training)
        return self.vae.decode(rearrange(z, "b f c h w -> b c f h w")).clamp(-1, 1)

    def prediction_inputs(self) -> dict:
        """What ``vidgen predict`` samples from without input clips: class labels, captions or nothing."""
        return {"kind": self.config.condition, "num_classes": self.config.num_classes}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Generate for the batch's labels/captions (random labels where absent); the ``PredictionWriter`` callback
        writes the files."""
        g = torch.Generator().manual_seed(batch_idx * 100003 + self.global_rank)
        batch = dict(batch)
        n = next((len(batch[k]) for k in ("label", "text", "video", "latents", "key") if batch.get(k) is not None),
                 self.num_samples)
        kwargs, _ = self.sampling_kwargs(batch, n, g)  # fixes the labels that generate() will use
        if "y" in kwargs:
            batch["label"] = kwargs["y"]
        videos = self.generate(batch, num_samples=n, generator=g)
        keys = list(batch.get("key") or [f"r{self.global_rank}_{batch_idx:05d}_{i:03d}" for i in range(n)])[:n]
        out: dict[str, Any] = {"videos": videos, "keys": keys}
        if "y" in kwargs:
            out["labels"] = kwargs["y"]
        if self.config.condition == "text":
            out["captions"] = list(batch["text"])[:n]
        return out


def _square(resolution: int | list[int] | tuple[int, int]) -> int:
    if isinstance(resolution, int):
        return resolution
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2 and resolution[0] == resolution[1]:
        return int(resolution[0])
    raise LatteConfigError(f"Latte uses square clips (official 256x256); resolution={resolution!r} is not square")


def _network_kwargs(a: Mapping[str, Any]) -> dict[str, Any]:
    """LatteConfig fields from the LightningModule's arguments (size table + overrides); for family 'pixart' with a
    diffusers ``init_from`` directory, the shape comes from its config.json (explicit arguments must agree)."""
    depth, hidden, heads = LATTE_SIZES[a["size"]]
    net = dict(
        patch_size=a["patch_size"], hidden_size=a["hidden_size"] or hidden, depth=a["depth"] or depth,
        num_heads=a["num_heads"] or heads, mlp_ratio=a["mlp_ratio"], variant=a["variant"],
        patch_embedding=a["patch_embedding"], tube_stride=a["tube_stride"], conditioning=a["conditioning"],
        condition=a["condition"], num_classes=a["num_classes"], class_dropout_prob=a["class_dropout_prob"],
        temporal_pos=a["temporal_pos"], learn_sigma=a["learn_sigma"], family=a["family"],
    )
    source = a.get("init_from")
    if a["family"] == "pixart" and source and os.path.isdir(source) and a.get("init_kind") in ("auto", "diffusers"):
        folder = diffusers_dir(source)
        with open(os.path.join(folder, "config.json")) as f:
            theirs = latte_kwargs_from_diffusers(json.load(f), f"{folder}/config.json")
        given = {"depth": a["depth"], "hidden_size": a["hidden_size"], "num_heads": a["num_heads"],
                 "patch_size": a["patch_size"], "learn_sigma": a["learn_sigma"]}
        clash = [f"{k}={v!r} (checkpoint: {theirs[k]!r})" for k, v in given.items() if v is not None and v != theirs[k]]
        if clash:
            raise LatteConfigError(f"model arguments disagree with {folder}/config.json: {', '.join(clash)}; remove "
                                   "them (the checkpoint's config.json sets the shape)")
        for k in ("input_size", "num_frames", "in_channels", "condition"):  # from the data, the VAE, the arguments
            theirs.pop(k)
        net.update(theirs)
    return net


# ----------------------------------------------------------------------------------------------------------------------
# Size table (§1.1): depth counts spatial + temporal blocks; MLP ratio 4; patch 2, 4 or 8
# ----------------------------------------------------------------------------------------------------------------------
LATTE_SIZES: dict[str, tuple[int, int, int]] = {
    #      depth  hidden  heads
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),  # 14 spatial + 14 temporal blocks, ~0.67B parameters
}

LATTE_MODELS: dict[str, dict[str, int]] = {
    f"Latte-{s}/{p}": {"depth": d, "hidden_size": h, "num_heads": n, "patch_size": p}
    for s, (d, h, n) in LATTE_SIZES.items()
    for p in (2, 4, 8)
}

_DEFAULTS = {name: p.default for name, p in inspect.signature(Latte.__init__).parameters.items() if name != "self"}
