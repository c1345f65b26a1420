"""Tora: trajectory-oriented diffusion transformer (arXiv 2407.21705; spec latte_tora.md §4) on the Open-Sora v1.2
STDiT3 base (``vidgen.lightning_modules.stdit``, spec §3).

Tora = STDiT3 + a Trajectory Extractor (TE) + Motion-guidance Fusers (MGF):

1. trajectories -> displacement maps g (§4.2 items 1-2) -> colour-wheel visualisation (item 3)
   (``nn/trajectory.py``);
2. a frozen **motion VAE** (the 3D autoencoder of ``configs/tora/motion_vae.yaml``, 4x temporal / 8x spatial, 4
   channels) encodes the visualisation into g_m, aligned with the video latent (item 4);
3. ``TrajectoryExtractor``: PixelUnshuffle to the DiT token grid, ``conv_in``, then stacked residual conv levels
   ``f_i = Conv^i(f_{i-1}) + f_{i-1}``, one per fused block (items 5-6);
4. ``MotionGuidanceFuser`` in the chosen blocks (the temporal ones in the paper), applied to the adaLN-modulated
   normalised input right before self-attention: extra channel, cross-attention or **adaptive norm** (§4.3). Every
   variant is the identity at initialisation, so Tora starts as its base model.

Training (§4.4, §4.6): adapter-like -- only parameters matching ``trainable`` (default: temporal blocks, extractor,
fusers) train; the rest is frozen, out of the optimizer and of the EMA. Dense optical flow first, then sparse
trajectories (``motion_mode``: dense | sparse, switched at a step by ``StagedCurriculum`` through ``motion_stages``
/ the ``TrajectoryCurriculum`` callback); image conditioning with ``x_mask`` (first frames kept clean, §3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vidgen.lightning_modules.nn.attention import CrossAttention, Mlp

__all__ = [
    "ToraConfigError",
    "TrajectoryExtractorConfig",
    "FuserConfig",
    "ResnetBlock",
    "TrajectoryExtractor",
    "ExtraChannelFuser",
    "CrossAttentionFuser",
    "AdaptiveNormFuser",
    "FUSERS",
    "PLACEMENTS",
    "build_fuser",
]

FUSERS = ("adaptive_norm", "extra_channel", "cross_attention")
PLACEMENTS = ("temporal", "spatial", "both")


class ToraConfigError(ValueError):
    """A Tora configuration that cannot work; the message names the key, the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# Trajectory Extractor (§4.2 items 5-6)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TrajectoryExtractorConfig:
    """TE (§4.2 item 6, the port's ``traj_module``): ``patch_size`` = the DiT's spatial patch, ``in_channels`` = motion
    latent channels (4), ``channels`` = d' (128), ``res_blocks`` per level (2); ``levels`` = number of fused blocks."""

    in_channels: int = 4
    channels: int = 128
    patch_size: int = 2
    res_blocks: int = 2
    levels: int = 28


class ResnetBlock(nn.Module):
    """One TE residual unit: (BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3) + identity (§4.2 item 6)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class TrajectoryExtractor(nn.Module):
    """g_m ``[B, C, T, h, w]`` -> per-level motion features ``[(B T), d', h/p, w/p]``, one per fused block:
    ``f_0 = conv_in(PixelUnshuffle(g_m))``, ``f_i = Conv^i(f_{i-1}) + f_{i-1}`` (§4.2 item 5)."""

    def __init__(self, config: TrajectoryExtractorConfig | dict):
        super().__init__()
        cfg = TrajectoryExtractorConfig(**config) if isinstance(config, dict) else config
        self.config = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.patch_size)
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, cfg.channels, 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(*[ResnetBlock(cfg.channels) for _ in range(cfg.res_blocks)]) for _ in range(cfg.levels))
        for m in self.modules():  # kaiming-normal (ReLU) weights, zero bias (the port's init)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, motion_latent: Tensor) -> list[Tensor]:
        b = motion_latent.shape[0]
        x = rearrange(motion_latent, "b c t h w -> (b t) c h w")
        p = self.config.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))  # the DiT pads its patches the same way
        f = self.conv_in(self.unshuffle(x))
        out = []
        for level in self.levels:
            f = level(f)  # each ResnetBlock adds its input: f_i = Conv^i(f_{i-1}) + f_{i-1}
            out.append(f)
        del b
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Motion-guidance Fusers (§4.3)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class FuserConfig:
    """MGF (§4.3): ``kind`` adaptive_norm (the paper's choice) | extra_channel | cross_attention; ``placement``
    temporal (the paper's) | spatial | both; ``groups`` of the adaptive norm's GroupNorm (32); ``heads`` of the
    cross-attention variant; ``mlp_ratio`` of the extra-channel MLP."""

    kind: str = "adaptive_norm"
    placement: str = "temporal"
    groups: int = 32
    heads: int = 8
    mlp_ratio: float = 1.0

    def validate(self, hidden_size: int) -> None:
        if self.kind not in FUSERS:
            raise ToraConfigError(f"fuser.kind={self.kind!r} is not one of {FUSERS}; the paper's choice is "
                                  "adaptive_norm (§4.3 table)")
        if self.placement not in PLACEMENTS:
            raise ToraConfigError(f"fuser.placement={self.placement!r} is not one of {PLACEMENTS}; the paper's "
                                  "choice is temporal (§4.3)")
        if self.kind == "adaptive_norm" and (hidden_size % self.groups or hidden_size % 4):
            raise ToraConfigError(f"fuser.groups={self.groups}: the adaptive-norm fuser needs hidden_size "
                                  f"({hidden_size}) divisible by groups and by 4; set fuser.groups to a divisor")
        if self.kind == "cross_attention" and hidden_size % self.heads:
            raise ToraConfigError(f"fuser.heads={self.heads} does not divide hidden_size={hidden_size}; set "
                                  "fuser.heads to a divisor")


def _tokens_to_maps(h: Tensor, T: int, hh: int, ww: int) -> Tensor:
    return rearrange(h, "b (t y x) d -> (b t) d y x", t=T, y=hh, x=ww)


class AdaptiveNormFuser(nn.Module):
    """MGF, adaptive norm (§4.3, chosen): ``h <- h + GroupNorm(h) * gamma(f) + beta(f)``; gamma and beta are each a
    per-frame Conv2d(d' -> d/4, 3x3) followed by a zero-initialised temporal Conv1d(d/4 -> d, k=3, replicate)."""

    def __init__(self, hidden_size: int, motion_channels: int, groups: int = 32):
        super().__init__()
        mid = hidden_size // 4
        self.norm = nn.GroupNorm(groups, hidden_size)
        self.gamma_spatial = nn.Conv2d(motion_channels, mid, 3, padding=1)
        self.beta_spatial = nn.Conv2d(motion_channels, mid, 3, padding=1)
        self.gamma_temporal = nn.Conv1d(mid, hidden_size, 3, padding=1, padding_mode="replicate")
        self.beta_temporal = nn.Conv1d(mid, hidden_size, 3, padding=1, padding_mode="replicate")
        for conv in (self.gamma_temporal, self.beta_temporal):  # identity at initialisation (§4.3: "vital")
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def _modulation(self, spatial: nn.Conv2d, temporal: nn.Conv1d, f: Tensor, T: int) -> Tensor:
        m = spatial(f)
        hh, ww = m.shape[-2:]
        m = temporal(rearrange(m, "(b t) c y x -> (b y x) c t", t=T))
        return rearrange(m, "(b y x) c t -> (b t) c y x", y=hh, x=ww)

    def forward(self, h: Tensor, f: Tensor, T: int, S: int) -> Tensor:
        hh, ww = f.shape[-2:]
        x = _tokens_to_maps(h, T, hh, ww)
        gamma = self._modulation(self.gamma_spatial, self.gamma_temporal, f, T)
        beta = self._modulation(self.beta_spatial, self.beta_temporal, f, T)
        x = x + self.norm(x) * gamma + beta
        return rearrange(x, "(b t) d y x -> b (t y x) d", t=T)


class ExtraChannelFuser(nn.Module):
    """MGF, extra channel (§4.3): ``h <- h + MLP([h, f])`` per token; the MLP's last layer is zero-initialised."""

    def __init__(self, hidden_size: int, motion_channels: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.mlp = Mlp(hidden_size + motion_channels, int(hidden_size * mlp_ratio), hidden_size, act="gelu_tanh")
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, h: Tensor, f: Tensor, T: int, S: int) -> Tensor:
        f = rearrange(f, "(b t) c y x -> b (t y x) c", t=T)
        return h + self.mlp(torch.cat([h, f.to(h.dtype)], dim=-1))


class CrossAttentionFuser(nn.Module):
    """MGF, cross-attention (§4.3): ``h <- h + CrossAttn(h, f)`` with the frame's motion features as keys/values
    (per frame: the S tokens of frame t attend to the S motion tokens of frame t); output projection zero-initialised."""

    def __init__(self, hidden_size: int, motion_channels: int, heads: int = 8):
        super().__init__()
        self.attn = CrossAttention(hidden_size, motion_channels, heads=heads)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, h: Tensor, f: Tensor, T: int, S: int) -> Tensor:
        q = rearrange(h, "b (t s) d -> (b t) s d", t=T)
        kv = rearrange(f, "bt c y x -> bt (y x) c").to(h.dtype)
        return h + rearrange(self.attn(q, kv), "(b t) s d -> b (t s) d", t=T)


def build_fuser(config: FuserConfig, hidden_size: int, motion_channels: int) -> nn.Module:
    """The MGF variant named by ``config.kind`` (§4.3), identity at initialisation."""
    if config.kind == "adaptive_norm":
        return AdaptiveNormFuser(hidden_size, motion_channels, config.groups)
    if config.kind == "extra_channel":
        return ExtraChannelFuser(hidden_size, motion_channels, config.mlp_ratio)
    if config.kind == "cross_attention":
        return CrossAttentionFuser(hidden_size, motion_channels, config.heads)
    raise ToraConfigError(f"fuser.kind={config.kind!r} is not one of {FUSERS}")
