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

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vidgen.lightning_modules.nn.attention import CrossAttention, Mlp
from vidgen.lightning_modules.nn.checkpoint import keep_out_of_checkpoints
from vidgen.lightning_modules.nn.trajectory import (
    dense_displacement,
    displacement_maps,
    flow_visualisation,
    load_trajectory_json,
    sample_sparse_trajectories,
)
from vidgen.lightning_modules.nn.vae import LatentAutoencoder, VAEConfig
from vidgen.lightning_modules.video_tokenizer import latent_autoencoder
from vidgen.lightning_modules.stdit import STDiT, STDiTConfigError, _pixel_size

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
    "MOTION_MODES",
    "TORA_TRAINABLE",
    "Tora",
]

FUSERS = ("adaptive_norm", "extra_channel", "cross_attention")
PLACEMENTS = ("temporal", "spatial", "both")


class ToraConfigError(STDiTConfigError):
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
        x = rearrange(motion_latent, "b c t h w -> (b t) c h w")
        p = self.config.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))  # the DiT pads its patches the same way
        f = self.conv_in(self.unshuffle(x))
        out = []
        for level in self.levels:
            f = level(f)  # each ResnetBlock adds its input: f_i = Conv^i(f_{i-1}) + f_{i-1}
            out.append(f)
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


def _batch_motion(f: Tensor, h: Tensor, T: int) -> Tensor:
    """Motion features ``[(n t), c, y, x]`` for a token batch of ``k * n`` clips: repeated k times (classifier-free
    guidance runs ``[cond; uncond]`` in one batch, and the port gives both branches the same motion, §4.6)."""
    rows = h.shape[0] * T
    if f.shape[0] != rows:
        if f.shape[0] == 0 or rows % f.shape[0]:
            raise ValueError(f"motion features for {f.shape[0] // T} clips cannot serve a batch of {h.shape[0]}")
        f = f.repeat(rows // f.shape[0], 1, 1, 1)
    return f


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
        f = _batch_motion(f, h, T)
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
        f = _batch_motion(f, h, T)
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
        f = _batch_motion(f, h, T)
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


# ----------------------------------------------------------------------------------------------------------------------
# Tora LightningModule
# ----------------------------------------------------------------------------------------------------------------------
MOTION_MODES = ("dense", "sparse")
# §4.4: "we solely train the temporal blocks, together with the TE and MGF" (regexes over named_parameters())
TORA_TRAINABLE = (r"^model\.temporal_blocks\.", r"^extractor\.", r"\.fuser\.")


class Tora(STDiT):
    """Tora (§4) = the STDiT3 text-to-video model (``STDiT``, every argument of which applies) + trajectory control.

    Args (Tora's own):
        motion_vae: ``VAEConfig`` fields of the frozen motion VAE that encodes the flow visualisations (§4.2 item 4,
            ``configs/tora/motion_vae.yaml``); None = the video VAE (the CogVideoX port's choice). Its latents must
            have the video latent's shape.
        extractor: ``TrajectoryExtractorConfig`` fields (channels d' = 128, res_blocks 2); ``levels`` is the depth.
        fuser: ``FuserConfig`` fields: kind adaptive_norm | extra_channel | cross_attention, placement temporal |
            spatial | both (§4.3).
        motion_mode: dense (optical flow, training stage 1) | sparse (1..max_tracks trajectories, stage 2); a
            ``StagedCurriculum`` stage switches it with ``model: {motion_mode: sparse}`` (§4.6).
        max_tracks (16), track_stride (32): the sparse sampler used when a batch brings flow but no trajectories.
        gaussian_size (99), gaussian_sigma (10): the filter applied to sparse displacement maps (§4.2 item 2).
        trainable: regexes over parameter names; only matching parameters train (§4.4; default temporal blocks,
            extractor, fusers). Everything else is frozen: out of the optimizer and of the EMA.
        motion_dropout: probability of training a sample without motion (motion-free guidance is not in the paper:
            0 by default).
        trajectory_file, first_frame: inference (``vidgen predict``): a JSON of trajectories drawn on a 256 x 256
            canvas (one list of [x, y] points per object; ``load_trajectory_json``) used for every prompt without its
            own ``batch["trajectories"]``, and an optional image for the first frame. Without a datamodule,
            ``vidgen predict`` makes one batch per prompt of ``prompts``.

    Batch: ``batch["flow"]`` float ``[B, T-1, 2, H', W']`` (pixels, between consecutive frames; resized to the clip)
    and/or ``batch["trajectories"]`` float ``[B, N, T, 2]`` (x, y pixels of the clip; NaN rows = no object).
    """

    def __init__(
        self,
        motion_vae: dict | None = None,
        extractor: dict | None = None,
        fuser: dict | None = None,
        motion_mode: str = "dense",
        max_tracks: int = 16,
        track_stride: int = 32,
        gaussian_size: int = 99,
        gaussian_sigma: float = 10.0,
        trainable: list[str] | None = None,
        motion_dropout: float = 0.0,
        trajectory_file: str | None = None,
        first_frame: str | None = None,
        **kwargs: Any,
    ):
        self._check_tora_args(motion_mode, max_tracks, track_stride, gaussian_size, gaussian_sigma, motion_dropout,
                              fuser, extractor, trajectory_file, first_frame)
        super().__init__(**kwargs)
        d = self.config.hidden_size
        self.fuser_config = FuserConfig(**(fuser or {}))
        self.fuser_config.validate(d)
        if motion_vae is not None:
            try:
                VAEConfig.coerce(motion_vae).validate()
            except (ValueError, TypeError, FileNotFoundError) as e:
                raise ToraConfigError(f"motion_vae: {e}") from None
            self.motion_vae = latent_autoencoder(motion_vae)
            if getattr(self.motion_vae, "from_file", False):
                keep_out_of_checkpoints(self, ["motion_vae."])
        else:
            self.motion_vae = None
        mvae = self.motion_vae if self.motion_vae is not None else self.vae
        if mvae.spatial_factor != self.vae.spatial_factor or mvae.temporal_factor != self.vae.temporal_factor:
            raise ToraConfigError(
                f"motion_vae compresses {mvae.temporal_factor}x{mvae.spatial_factor} (time x space) but the video VAE "
                f"{self.vae.temporal_factor}x{self.vae.spatial_factor}: motion latents must align with video latents "
                "(§4.2 item 4); use a motion VAE with the video VAE's compression")
        ext = {"in_channels": mvae.latent_channels, "channels": 128, "patch_size": self.config.patch_size[-1],
               **(extractor or {}), "levels": self.config.depth}
        self.extractor = TrajectoryExtractor(TrajectoryExtractorConfig(**ext))
        placement = self.fuser_config.placement
        for name in ("spatial", "temporal"):
            if placement in (name, "both"):
                for block in getattr(self.model, f"{name}_blocks"):
                    block.fuser = build_fuser(self.fuser_config, d, self.extractor.config.channels)
        self.motion_mode = motion_mode
        self.trainable_patterns = list(TORA_TRAINABLE if trainable is None else trainable)
        self._freeze_untrainable()
        self._generate_batch: Mapping[str, Any] | None = None

    @staticmethod
    def _check_tora_args(motion_mode, max_tracks, track_stride, gaussian_size, gaussian_sigma, motion_dropout,
                         fuser, extractor, trajectory_file=None, first_frame=None) -> None:
        if motion_mode not in MOTION_MODES:
            raise ToraConfigError(f"motion_mode={motion_mode!r} is not one of {MOTION_MODES}; dense (flow) is stage 1, "
                                  "sparse (trajectories) stage 2 (§4.6)")
        if not isinstance(max_tracks, int) or max_tracks < 1:
            raise ToraConfigError(f"max_tracks must be a positive integer (the paper's N = 16), got {max_tracks!r}")
        if not isinstance(track_stride, int) or track_stride < 1:
            raise ToraConfigError(f"track_stride must be a positive integer (32), got {track_stride!r}")
        if not isinstance(gaussian_size, int) or gaussian_size < 1 or gaussian_size % 2 == 0 or gaussian_sigma <= 0:
            raise ToraConfigError(f"gaussian_size must be a positive odd integer and gaussian_sigma > 0 (99 and 10, "
                                  f"§4.2), got {gaussian_size!r} and {gaussian_sigma!r}")
        for key, path in (("trajectory_file", trajectory_file), ("first_frame", first_frame)):
            if path is not None and not os.path.isfile(path):
                raise ToraConfigError(f"{key} {path!r} does not exist; give a local file")
        if not 0 <= motion_dropout < 1:
            raise ToraConfigError(f"motion_dropout must be in [0, 1), got {motion_dropout!r}")
        for key, value, cls in (("fuser", fuser, FuserConfig), ("extractor", extractor, TrajectoryExtractorConfig)):
            unknown = sorted(set(value or {}) - set(cls.__dataclass_fields__))
            if unknown:
                raise ToraConfigError(f"{key} has unknown keys {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        if extractor and "levels" in extractor:
            raise ToraConfigError("extractor.levels is the model depth (one level per fused block); remove it")

    def _freeze_untrainable(self) -> None:
        """§4.4: only parameters matching ``trainable`` keep ``requires_grad`` (frozen nets stay frozen)."""
        try:
            patterns = [re.compile(p) for p in self.trainable_patterns]
        except re.error as e:
            raise ToraConfigError(f"trainable: {e}; give regular expressions over parameter names") from None
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        for pat in patterns:
            if not any(pat.search(n) for n in names):
                raise ToraConfigError(f"trainable pattern {pat.pattern!r} matches no parameter (names look like "
                                      f"{names[:3]}); fix or remove it")
        for n, p in self.named_parameters():
            if p.requires_grad and not any(pat.search(n) for pat in patterns):
                p.requires_grad_(False)

    def set_curriculum_settings(self, settings: Mapping[str, Any]) -> None:
        """``StagedCurriculum`` stage ``model:`` settings: ``motion_mode`` (dense -> sparse, §4.6)."""
        unknown = sorted(set(settings) - {"motion_mode"})
        if unknown:
            raise ToraConfigError(f"curriculum model settings {unknown} are not Tora settings; allowed: ['motion_mode']")
        if "motion_mode" in settings:
            if settings["motion_mode"] not in MOTION_MODES:
                raise ToraConfigError(f"curriculum motion_mode={settings['motion_mode']!r} is not one of {MOTION_MODES}")
            self.motion_mode = settings["motion_mode"]

    # -- motion conditioning -------------------------------------------------------------------------------------------
    def _sparse_from_flow(self, flow: Tensor, index: int) -> np.ndarray:
        seed = hash((int(self.global_step), index, int(getattr(self, "_sparse_seed", 0)))) % (2**32)
        return sample_sparse_trajectories(flow, seed, self.hparams.max_tracks, self.hparams.track_stride)

    def displacement(self, batch: Mapping[str, Any], n: int, frames: int, height: int, width: int) -> Tensor | None:
        """g ``[n, T, 2, H, W]`` for the batch (§4.2), or None when it carries neither flow nor trajectories."""
        hp = self.hparams
        flow, trajs = batch.get("flow"), batch.get("trajectories")
        if flow is None and trajs is None:
            return None
        if flow is not None:
            flow = torch.as_tensor(flow)[:n].float().cpu()
            if flow.shape[1] != frames - 1:
                raise ValueError(f"batch['flow'] holds {flow.shape[1]} flows, the clip needs {frames - 1} "
                                 f"([B, T-1, 2, H, W] between consecutive frames)")
            fh, fw = flow.shape[-2:]
            if (fh, fw) != (height, width):  # resize to the clip and rescale the displacements with it
                flow = rearrange(F.interpolate(rearrange(flow, "b t c h w -> (b t) c h w"), size=(height, width),
                                               mode="bilinear", align_corners=False), "(b t) c h w -> b t c h w", b=n)
                flow = flow * torch.tensor([width / fw, height / fh]).view(1, 1, 2, 1, 1)
        out = []
        for i in range(n):
            if self.motion_mode == "dense" and flow is not None:
                out.append(dense_displacement(flow[i]))
                continue
            tr = trajs[i] if trajs is not None else self._sparse_from_flow(flow[i], i)
            out.append(displacement_maps(tr, height, width, blur=True, kernel_size=hp.gaussian_size,
                                         sigma=hp.gaussian_sigma)[:frames])
        return torch.stack(out)

    def motion_features(self, batch: Mapping[str, Any], z: Tensor) -> dict[str, tuple[Tensor, ...]]:
        """The network's motion kwargs for latents ``z``: maps -> colour wheel -> motion VAE -> TE levels (§4.2)."""
        if batch.get("motion_latents") is not None:  # cached motion-VAE latents (scaled), e.g. the demo's
            m = batch["motion_latents"][: z.shape[0]].to(self.device, torch.float32)
        else:
            m = self.motion_latents(batch, z)
        return {} if m is None else self._fuse_kwargs(m, z)

    def motion_latents(self, batch: Mapping[str, Any], z: Tensor) -> Tensor | None:
        """g_m: the motion VAE's (scaled) latents of the batch's motion, or None without motion (§4.2 items 1-4)."""
        n, _, t, h, w = z.shape
        video = batch.get("video")
        if isinstance(video, Tensor) and video.ndim == 5:
            frames, height, width = video.shape[2:]
        else:
            frames, height, width = self.pixel_frames(t), h * self.vae.spatial_factor, w * self.vae.spatial_factor
        g = self.displacement(batch, n, frames, height, width)
        if g is None:
            return None
        mvae = self.motion_vae if self.motion_vae is not None else self.vae
        with torch.no_grad():
            return mvae.encode(flow_visualisation(g).to(self.device))

    def _fuse_kwargs(self, m: Tensor, z: Tensor) -> dict[str, tuple[Tensor, ...]]:
        n = z.shape[0]
        if m.shape[2:] != z.shape[2:]:
            raise ValueError(f"motion latents {tuple(m.shape[1:])} do not align with the video latents "
                             f"{tuple(z.shape[1:])} (§4.2 item 4)")
        if self.training and self.hparams.motion_dropout > 0:
            keep = (torch.rand(n, device=m.device) >= self.hparams.motion_dropout).to(m.dtype)
            m = m * rearrange(keep, "b -> b 1 1 1 1")
        # a tuple, not a list: guidance joins per-sample lists of the batch's length, the levels are not samples
        feats = tuple(self.extractor(m.to(z.dtype) if z.device.type != "meta" else m))
        placement = self.fuser_config.placement
        out = {}
        if placement in ("temporal", "both"):
            out["motion"] = feats
        if placement in ("spatial", "both"):
            out["motion_spatial"] = feats
        return out

    def model_kwargs(self, batch: Mapping[str, Any], z: Tensor) -> dict[str, Any]:
        kwargs = super().model_kwargs(batch, z)
        source = self._generate_batch if self._generate_batch is not None else batch
        kwargs.update(self.motion_features(source, z))
        return kwargs

    def trainable_parameters(self) -> list[nn.Parameter]:
        """§4.4: the frozen parts are not in the optimizer; the trajectory modules (outside ``self.model``) are."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- inference -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Videos ``[B, C, T, H, W]`` in [-1, 1] for ``batch["text"]`` following ``batch["trajectories"]`` (pixel
        coordinates of the output clip; none: the base model's sample). ``batch["first_frame"]`` ``[B, C, H, W]``
        conditions on a given first frame (x_mask False for the first latent frame, §4.6 image conditioning).
        The motion features go to both guidance branches: only the text is guided (the port's sampler)."""
        batch = dict(batch or {})
        self._inference_inputs(batch)
        first = batch.pop("first_frame", None)
        if first is not None:
            n = first.shape[0]
            h, w = first.shape[-2:]
            frames = int(self.hparams.num_frames)
            batch["video"] = first.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()
            _, t, _, _ = self.vae.latent_shape(frames, h, w)
            x_mask = torch.ones(n, t, dtype=torch.bool)
            x_mask[:, 0] = False
            batch["x_mask"] = x_mask
        self._generate_batch = batch
        try:
            return super().generate(batch or None, num_samples=num_samples, generator=generator)
        finally:
            self._generate_batch = None

    def _inference_inputs(self, batch: dict) -> None:
        """Fill ``trajectories`` / ``first_frame`` of a sampling batch from ``trajectory_file`` / ``first_frame``."""
        hp = self.hparams
        texts = list(batch.get("text") or hp.prompts or [])
        n = max(1, len(texts))
        height, width = _pixel_size(hp.resolution)
        if batch.get("trajectories") is None and hp.trajectory_file:
            trajs = load_trajectory_json(hp.trajectory_file, int(hp.num_frames), width, height)
            batch["trajectories"] = torch.from_numpy(trajs)[None].expand(n, -1, -1, -1)
        if batch.get("first_frame") is None and hp.first_frame:
            from PIL import Image

            with Image.open(hp.first_frame) as im:
                img = im.convert("RGB").resize((width, height), Image.BICUBIC)
            frame = torch.from_numpy(np.asarray(img).copy()).float().div(127.5).sub(1)
            batch["first_frame"] = rearrange(frame, "h w c -> 1 c h w").expand(n, -1, -1, -1).to(self.device)

    def predict_dataloader(self):
        """Without a datamodule: one batch per prompt (``vidgen predict --model.prompts [...]``)."""
        prompts = list(self.hparams.prompts or [])
        if not prompts:
            raise ToraConfigError("vidgen predict without data needs model.prompts (a list of captions)")
        return [{"text": [p], "key": [f"prompt{i:03d}"]} for i, p in enumerate(prompts)]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"videos", "keys", "captions", "trajectories"}`` (the writer draws the trajectories over the grid and keeps
        them in samples.npz)."""
        batch = dict(batch)
        self._inference_inputs(batch)
        out = super().predict_step(batch, batch_idx, dataloader_idx)
        if batch.get("trajectories") is not None:
            out["trajectories"] = torch.as_tensor(batch["trajectories"])[: out["videos"].shape[0]].float().cpu()
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Size table: Tora on STDiT3 (§4.2 item 6: d' = 128, 2 ResnetBlocks per level, one level per temporal block)
# ----------------------------------------------------------------------------------------------------------------------
TORA_SIZES: dict[str, dict[str, Any]] = {
    "S/2": {"size": "S/2", "extractor": {"channels": 128, "res_blocks": 2}},    # 12 levels
    "XL/2": {"size": "XL/2", "extractor": {"channels": 128, "res_blocks": 2}},  # 28 levels, the paper's base
}
