"""Frozen latent autoencoder for latent video diffusion (Latte §1.11, Tora): video <-> scaled latents.

``LatentAutoencoder(kind=...)`` wraps one of

- ``"diffusers"``: a diffusers ``AutoencoderKL`` from a LOCAL directory (``path`` or ``path/vae``; e.g. the SD VAE
  ``sd-vae-ft-ema`` Latte uses). Frames are encoded one by one (per-frame 2D VAE, ``chunk`` frames per call):
  ``z = latent_dist.sample() * scale_factor`` (0.18215, as Latte), decoded as ``vae.decode(z / scale_factor)``.
- ``"tokenizer"``: our ``VideoTokenizer`` KL (or plain AE) checkpoint (``VideoTokenizer.load_frozen(path)``): the
  whole clip goes through it (per-frame when the tokenizer is 2D, ``arch.dims: 2``); ``z = latents * scale_factor``.
- ``"pixels"``: NOT an autoencoder. A pixel-space stand-in for CPU smoke tests only: "latents" are the frames
  average-pooled by ``factor`` (3 channels), decoded by nearest upsampling. Results trained on it say nothing
  about a real latent model.

Layout: ``encode(video [B, C, T, H, W] in [-1, 1]) -> [B, c, t, h, w]``; ``decode`` the reverse (unclamped).
Weights never get gradients and the module stays in eval mode. ``from_file`` is True when the weights come from a
path (a LightningModule may leave them out of its checkpoints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["VAE_KINDS", "VAEConfig", "LatentAutoencoder"]

VAE_KINDS = ("diffusers", "tokenizer", "pixels")
SD_SCALE_FACTOR = 0.18215


@dataclass
class VAEConfig:
    """kind: diffusers | tokenizer | pixels (test stand-in). path: local dir (diffusers) or checkpoint (tokenizer).

    scale_factor: multiplies latents after encoding (None: 0.18215 for diffusers, 1.0 otherwise).
    sample: draw from the posterior (Latte: ``latent_dist.sample()``) instead of taking its mean.
    chunk: frames per diffusers encode/decode call. factor: spatial pooling of the ``pixels`` stand-in.
    micro_frame_size: tokenizer VAEs only: encode the clip in independent chunks of this many frames and decode
        their latents chunk by chunk (Open-Sora v1.2 ``micro_frame_size=17``: a causal 4x VAE turns each 17 frames
        into 5 latents, so 51 -> 15, 102 -> 30). None: the whole clip at once.
    """

    kind: Literal["diffusers", "tokenizer", "pixels"] = "diffusers"
    path: str | None = None
    scale_factor: float | None = None
    sample: bool = True
    chunk: int = 16
    factor: int = 8
    micro_frame_size: int | None = None

    def validate(self, check_files: bool = True) -> None:
        if self.kind not in VAE_KINDS:
            raise ValueError(f"vae.kind must be one of {VAE_KINDS}, got {self.kind!r}")
        if self.kind in ("diffusers", "tokenizer"):
            if not self.path:
                what = "a local AutoencoderKL directory" if self.kind == "diffusers" else "a VideoTokenizer checkpoint"
                raise ValueError(f"vae.kind={self.kind!r} needs vae.path: {what} (weights are never downloaded)")
            if check_files and not os.path.exists(self.path):
                raise FileNotFoundError(f"vae.path {self.path!r} does not exist")
        if self.kind == "pixels" and self.factor < 1:
            raise ValueError(f"vae.factor must be >= 1, got {self.factor}")
        if self.chunk < 1:
            raise ValueError(f"vae.chunk must be >= 1, got {self.chunk}")
        if self.micro_frame_size is not None and (self.kind != "tokenizer" or self.micro_frame_size < 1):
            raise ValueError(f"vae.micro_frame_size={self.micro_frame_size!r} needs vae.kind 'tokenizer' and a "
                             "positive frame count (Open-Sora v1.2: 17); set it to null otherwise")

    @classmethod
    def coerce(cls, value: VAEConfig | dict | None) -> VAEConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown vae keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**value)


class LatentAutoencoder(nn.Module):
    """Frozen video <-> latent adapter (see the module docstring)."""

    def __init__(self, config: VAEConfig | dict | None = None):
        super().__init__()
        cfg = VAEConfig.coerce(config)
        cfg.validate()
        self.config = cfg
        self.kind = cfg.kind
        self.from_file = cfg.kind in ("diffusers", "tokenizer")
        self.scale_factor = cfg.scale_factor if cfg.scale_factor is not None else (
            SD_SCALE_FACTOR if cfg.kind == "diffusers" else 1.0)
        self.model: nn.Module | None = None
        if cfg.kind == "diffusers":
            try:
                from diffusers import AutoencoderKL
            except ImportError as e:
                raise ImportError("vae.kind='diffusers' needs diffusers installed (`pip install diffusers`)") from e
            sub = "vae" if os.path.isdir(os.path.join(cfg.path, "vae")) else None
            self.model = AutoencoderKL.from_pretrained(cfg.path, subfolder=sub, local_files_only=True)
            self.latent_channels = int(self.model.config.latent_channels)
            self.spatial_factor = 2 ** (len(self.model.config.block_out_channels) - 1)
            self.temporal_factor = 1
        elif cfg.kind == "tokenizer":
            from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

            tok = VideoTokenizer.load_frozen(cfg.path)
            if tok.bcfg.kind not in ("kl", "none"):
                raise ValueError(
                    f"{cfg.path} is a {tok.bcfg.kind!r} tokenizer: its codes are discrete. Latent diffusion needs a "
                    "continuous latent: train the tokenizer with bottleneck.kind 'kl' (or 'none')"
                )
            self.model = tok
            self.latent_channels = tok.latent_channels
            self.spatial_factor = tok.arch.spatial_factor
            self.temporal_factor = tok.arch.temporal_factor
            self._causal = tok.arch.causal
        else:
            self.latent_channels, self.spatial_factor, self.temporal_factor = 3, cfg.factor, 1
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LatentAutoencoder:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    # ------------------------------------------------------------------------------------------------------ shapes
    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(c, t, h, w) of the latents of a ``frames x height x width`` clip; errors name the fix."""
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the VAE's spatial factor {s}")
        if self.kind == "tokenizer":
            t = sum(self.model.validate_frames(n, self.model.arch) for n in self._micro_chunks(frames))
        else:
            t = frames
        return self.latent_channels, t, height // s, width // s

    def video_frames(self, latent_frames: int) -> int:
        """Video frames behind ``latent_frames`` (causal 4x: 1 + 4(t - 1), 5 -> 17; with ``micro_frame_size`` 17:
        15 -> 51); the inverse of ``latent_shape`` on the time axis."""
        tf = self.temporal_factor
        if tf == 1:
            return latent_frames

        def one(n: int) -> int:
            return 1 + tf * (n - 1) if getattr(self, "_causal", True) else tf * n

        m = self.config.micro_frame_size
        if not m:
            return one(latent_frames)
        per = self.model.validate_frames(m, self.model.arch)
        full, rest = divmod(latent_frames, per)
        return full * m + (one(rest) if rest else 0)

    def _micro_chunks(self, frames: int) -> list[int]:
        """Frame counts of the independently coded chunks (``micro_frame_size``; one chunk when unset)."""
        m = self.config.micro_frame_size
        if not m or frames <= m:
            return [frames]
        return [m] * (frames // m) + ([frames % m] if frames % m else [])

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    # ------------------------------------------------------------------------------------------------------ codec
    @torch.no_grad()
    def encode(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Video ``[B, C, T, H, W]`` in [-1, 1] -> scaled latents ``[B, c, t, h, w]`` (float32)."""
        if video.ndim != 5:
            raise ValueError(f"expected video [B, C, T, H, W], got shape {tuple(video.shape)}")
        b = video.shape[0]
        if self.kind == "pixels":
            frames = rearrange(video.float(), "b c t h w -> (b t) c h w")
            z = F.avg_pool2d(frames, self.spatial_factor) if self.spatial_factor > 1 else frames
            return rearrange(z, "(b t) c h w -> b c t h w", b=b) * self.scale_factor
        if self.kind == "tokenizer":
            parts = video.to(self.dtype).split(self._micro_chunks(video.shape[2]), dim=2)
            z = torch.cat([self.model.encode(p, sample=self.config.sample, generator=generator) for p in parts], dim=2)
            return z.float() * self.scale_factor
        frames = rearrange(video, "b c t h w -> (b t) c h w").to(self.dtype)
        out = []
        for chunk in frames.split(self.config.chunk):
            dist = self.model.encode(chunk).latent_dist
            out.append(dist.sample(generator=generator) if self.config.sample else dist.mode())
        z = torch.cat(out).float() * self.scale_factor
        return rearrange(z, "(b t) c h w -> b c t h w", b=b)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``[B, c, t, h, w]`` -> video ``[B, C, T, H, W]`` (about [-1, 1], not clamped)."""
        if latents.ndim != 5:
            raise ValueError(f"expected latents [B, c, t, h, w], got shape {tuple(latents.shape)}")
        b = latents.shape[0]
        z = latents.float() / self.scale_factor
        if self.kind == "pixels":
            frames = rearrange(z, "b c t h w -> (b t) c h w")
            if self.spatial_factor > 1:
                frames = F.interpolate(frames, scale_factor=self.spatial_factor, mode="nearest")
            return rearrange(frames, "(b t) c h w -> b c t h w", b=b)
        if self.kind == "tokenizer":
            m = self.config.micro_frame_size
            if not m:
                return self.model.decode(z.to(self.dtype)).float()
            per = self.model.validate_frames(m, self.model.arch)  # latent frames of one full chunk (17 -> 5)
            parts = z.to(self.dtype).split(per, dim=2)
            return torch.cat([self.model.decode(p) for p in parts], dim=2).float()
        frames = rearrange(z, "b c t h w -> (b t) c h w").to(self.dtype)
        out = torch.cat([self.model.decode(chunk).sample for chunk in frames.split(self.config.chunk)])
        return rearrange(out.float(), "(b t) c h w -> b c t h w", b=b)

    def extra_repr(self) -> str:
        note = "  [pixel-space stand-in, not a VAE]" if self.kind == "pixels" else ""
        return f"kind={self.kind}, scale_factor={self.scale_factor}, spatial_factor={self.spatial_factor}{note}"
