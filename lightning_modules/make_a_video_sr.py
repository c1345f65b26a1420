"""Make-A-Video super-resolution: SR_l^t (spatiotemporal, 64 -> 256) and SR_h (spatial, per frame, 256 -> 768)
(Singer et al. 2022, §3.1-§3.2; spec make_a_video_videopoet.md §1.1 rows 5-6, §1.2, §1.3, §1.5).

Both are the cascade's U-Net (``nn/unet.py``) conditioned on the low-resolution video: bilinearly upsampled to the
output size and concatenated to the noisy input (``UNetConfig.cond_in_channels=3``, zero-initialised input weights;
cascaded DDPM / Imagen [unverified for MAV]). The conditioning is **noise-augmented**: a level ``s`` is drawn in
training and the upsampled video becomes ``q(x_s | lr)`` of the same noise schedule; ``s`` is embedded like a
timestep (``UNetConfig.noise_aug_cond``) and chosen at sampling (``sample_aug_level``) (Imagen / cascaded DDPM
"conditioning augmentation" [unverified for MAV]). They see no text and no y_e (§1.1 notes). Training inputs are
downsampled (antialiased bilinear) high-resolution frames (§1.1 notes).

* ``SpatiotemporalSR`` = ``MakeAVideoSR(stage='spatiotemporal')``, SR_l^t: trained on images first
  (``phase='image'``: no temporal layers), then on video (``phase='video'``, ``init_from`` the image phase: the
  temporal layers start at identity, as D^t). 76 frames need not fit at once: ``chunk_frames``/``chunk_overlap``
  denoise overlapping temporal windows and average the model outputs where they overlap, at every step
  (MultiDiffusion-style; the paper does not say how SR_l^t handles 76 frames [unverified]). Off by default.
* ``MakeAVideoSR(stage='spatial')``, SR_h: no temporal layers (§1.3: temporal layers go into D^t, ↑F and SR_l^t
  only); every frame is super-resolved alone, with **the same initial noise for every frame of a clip** (§1.1; the
  noise differs between clips) so hallucinated detail stays consistent across frames. The noise augmentation of the
  conditioning is shared across the frames of a clip for the same reason. ``frame_batch`` bounds the frames per U-Net
  call (memory); it does not change the result with the deterministic DDIM sampler.

Sampling starts from pure noise (``sample_start: 1``) or, with ``sample_start: 1/k``, from the upsampled input noised
to the top of the schedule's first ``1/k`` (SDEdit-style truncated sampling [unverified for MAV]). In the demo
(2026-12-02) the tiny SR nets sampled from pure noise kept the D^t sample's colour in 50-67% of the clips against 92%
at the D^t stage; from 1/3 they kept all of it (92%), see ``vidgen/demos/make_a_video.py`` ``SR_START``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from vidgen.lightning_modules.make_a_video import (CLIPConditionedDiffusion, MakeAVideoConfigError, _defaults,
                                                   _diffusion_args, unet_state_dict, video_stage_adamw)
from vidgen.lightning_modules.make_a_video_interp import _check_unet
from vidgen.lightning_modules.nn.checkpoint import KeyReport
from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion
from vidgen.lightning_modules.nn.diffusion.common import randint, randn
from vidgen.lightning_modules.nn.unet import PseudoAttention3d, ResBlock, UNet, unet_config

__all__ = ["MakeAVideoSR", "temporal_windows", "chunked_over_time", "downsample", "upsample_bilinear"]


def downsample(video: Tensor, factor: int) -> Tensor:
    """``[B, C, (T,) H, W]`` -> ``H/factor x W/factor`` per frame, antialiased bilinear (the SR training input)."""
    x = rearrange(video, "b c t h w -> (b t) c h w") if video.ndim == 5 else video
    y = F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
    return rearrange(y, "(b t) c h w -> b c t h w", b=video.shape[0]) if video.ndim == 5 else y


def upsample_bilinear(video: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, C, (T,) h, w]`` -> ``size`` per frame, bilinear (what the SR U-Net is conditioned on)."""
    x = rearrange(video, "b c t h w -> (b t) c h w") if video.ndim == 5 else video
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return rearrange(y, "(b t) c h w -> b c t h w", b=video.shape[0]) if video.ndim == 5 else y


def temporal_windows(num_frames: int, chunk: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` windows of ``chunk`` frames with at least ``overlap`` shared frames, covering every frame;
    the last window ends at the last frame."""
    if chunk <= 0 or chunk >= num_frames:
        return [(0, num_frames)]
    if not 0 <= overlap < chunk:
        raise ValueError(f"chunk_overlap must be in [0, chunk_frames), got {overlap} for {chunk}")
    starts = list(range(0, num_frames - chunk, chunk - overlap)) + [num_frames - chunk]
    return [(s, s + chunk) for s in sorted(set(starts))]


def chunked_over_time(model_fn: Callable[..., Tensor], chunk: int, overlap: int) -> Callable[..., Tensor]:
    """Wrap ``model_fn(x [B, C, T, H, W], t, **kw)`` to run on overlapping temporal windows and average the outputs
    where windows overlap (video-shaped kwargs with the same T are cut the same way)."""

    def fn(x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        frames = x.shape[2]
        wins = temporal_windows(frames, chunk, overlap)
        if len(wins) == 1:
            return model_fn(x, t, **kw)
        out, count = None, torch.zeros(frames, device=x.device, dtype=torch.float32)
        for s, e in wins:
            kws = {k: (v[:, :, s:e] if isinstance(v, Tensor) and v.ndim == 5 and v.shape[2] == frames else v)
                   for k, v in kw.items()}
            y = model_fn(x[:, :, s:e], t, **kws).float()
            if out is None:
                out = y.new_zeros(y.shape[0], y.shape[1], frames, *y.shape[3:])
            out[:, :, s:e] += y
            count[s:e] += 1
        return out / rearrange(count, "t -> 1 1 t 1 1")

    return fn


class MakeAVideoSR(CLIPConditionedDiffusion):
    """SR_l^t (``stage='spatiotemporal'``) and SR_h (``stage='spatial'``): noise-augmented, LR-concatenated U-Nets.

    Args:
        stage: 'spatiotemporal' (SR_l^t, temporal layers in the video phase) or 'spatial' (SR_h, never temporal).
        phase: 'image' (train on frames/images as images; SR_h is always 'image') or 'video' (SR_l^t on clips).
        unet: ``UNetConfig`` fields (``size`` picks a row of ``UNET_SIZES``); temporal / cond_in_channels=3 /
            noise_aug_cond are set here (no y_e: ``cond_dim`` 0).
        scale_factor: output / input size (SR_l^t 64 -> 256: 4; SR_h 256 -> 768: 3).
        resolution, num_frames: the high-resolution training clips (linked from data).
        init_from: SR_l^t video phase: its image-phase checkpoint (temporal layers new, at identity).
        spatial_lr_scale: video phase: lr multiplier of the image-phase (spatial) layers (0 freezes them).
        noise_aug_max: training aug levels are uniform over the first ``noise_aug_max`` of the schedule's timesteps.
        sample_aug_level: the aug level used at sampling, as a fraction of the schedule (0: clean conditioning).
        chunk_frames, chunk_overlap: SR_l^t sampling on overlapping temporal windows (0: all frames at once).
        frame_batch: SR_h frames per U-Net call when sampling (0: all frames of the batch at once).
        shared_noise: SR_h: one initial noise (and aug noise) per clip, repeated over its frames (§1.1); False draws
            it per frame (the ablation).
        sample_start: where sampling starts, as a fraction ``1/k`` of the schedule: 1 from pure noise (the paper);
            ``1/k`` from the upsampled input noised to the top of the schedule's first ``1/k``,
            ``q(x_t0 | up(low))``, with the ``sample_steps`` steps spread below ``t0`` (SDEdit-style truncated
            sampling [unverified for MAV]: coarse content and colour come from the input, the model adds detail).
        diffusion, sampler, sample_steps: as ``MakeAVideoDecoder`` (fewer steps than the decoder, §1.6 [unverified]).
    """

    fsdp_block_classes = (ResBlock, PseudoAttention3d)
    denoiser_name = "unet"

    def __init__(
        self,
        stage: Literal["spatiotemporal", "spatial"] = "spatiotemporal",
        phase: Literal["image", "video"] = "video",
        unet: dict | None = None,
        scale_factor: int = 4,
        resolution: int = 256,
        num_frames: int = 16,
        init_from: str | None = None,
        spatial_lr_scale: float = 1.0,
        noise_aug_max: float = 0.5,
        sample_aug_level: float = 0.1,
        chunk_frames: int = 0,
        chunk_overlap: int = 4,
        frame_batch: int = 0,
        shared_noise: bool = True,
        sample_start: float = 1.0,
        diffusion: dict | None = None,
        sampler: Literal["ddpm", "ddim"] = "ddim",
        sample_steps: int | str = 32,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.validate_config(dict(self.hparams))
        ucfg = dict(unet or {})
        size = ucfg.pop("size", None)
        self.unet_config = unet_config(size, **{**ucfg, "temporal": self.temporal, "fps_cond": False, "cond_dim": 0,
                                                "cond_in_channels": 3, "noise_aug_cond": True})
        self.unet = UNet(self.unet_config)
        self.diffusion = create_diffusion(DiffusionConfig(**_diffusion_args(self.hparams)))
        self.load_report: KeyReport | None = None
        if init_from:
            self.load_report = r = self.unet.load_image_weights(unet_state_dict(init_from), source=init_from)
            print(f"[make_a_video] SR_l image phase -> video phase: loaded {len(r.loaded)} tensors from {init_from}; "
                  f"{len(r.missing)} new temporal tensors start at identity", flush=True)
        if self.temporal and spatial_lr_scale == 0:
            for name, p in self.unet.named_parameters():
                p.requires_grad_(UNet.is_new_video_parameter(name))

    @property
    def temporal(self) -> bool:
        return self.hparams.stage == "spatiotemporal" and self.hparams.phase == "video"

    @classmethod
    def validate_config(cls, args: Mapping[str, Any]) -> None:
        a = {**_defaults(cls), **dict(args)}
        if a["stage"] not in ("spatiotemporal", "spatial"):
            raise MakeAVideoConfigError(f"SR stage must be 'spatiotemporal' (SR_l^t) or 'spatial' (SR_h), got {a['stage']!r}")
        if a["phase"] not in ("image", "video"):
            raise MakeAVideoConfigError(f"SR phase must be 'image' or 'video', got {a['phase']!r}")
        if a["stage"] == "spatial" and a["phase"] != "image":
            raise MakeAVideoConfigError("SR_h has no temporal layers (§1.3): set phase: image for stage: spatial")
        if a["scale_factor"] < 1:
            raise MakeAVideoConfigError(f"scale_factor must be >= 1, got {a['scale_factor']}")
        if not 0 <= a["noise_aug_max"] <= 1 or not 0 <= a["sample_aug_level"] <= 1:
            raise MakeAVideoConfigError("noise_aug_max and sample_aug_level are fractions of the schedule in [0, 1]")
        k = 1 / a["sample_start"] if a["sample_start"] > 0 else 0
        if not 0 < a["sample_start"] <= 1 or abs(k - round(k)) > 1e-6:
            raise MakeAVideoConfigError(f"sample_start must be 1/k for an integer k >= 1 (1, 0.5, 0.25, ...), "
                                        f"got {a['sample_start']}")
        if a["sample_start"] < 1 and not isinstance(a["sample_steps"], int):
            raise MakeAVideoConfigError("sample_start < 1 spreads an integer number of sample_steps below t0: set "
                                        f"sample_steps to an int, got {a['sample_steps']!r}")
        if a["chunk_frames"] < 0 or a["frame_batch"] < 0:
            raise MakeAVideoConfigError("chunk_frames and frame_batch must be >= 0 (0: off)")
        if a["chunk_frames"] and not 0 <= a["chunk_overlap"] < a["chunk_frames"]:
            raise MakeAVideoConfigError(f"chunk_overlap must be in [0, chunk_frames={a['chunk_frames']}), "
                                        f"got {a['chunk_overlap']}")
        if a["chunk_frames"] and a["stage"] == "spatial":
            raise MakeAVideoConfigError("chunk_frames is for SR_l^t; SR_h bounds memory with frame_batch")
        if a["frame_batch"] and a["stage"] != "spatial":
            raise MakeAVideoConfigError("frame_batch is for SR_h (per-frame); SR_l^t bounds memory with chunk_frames")
        if a["init_from"] and not os.path.isfile(a["init_from"]):
            raise MakeAVideoConfigError(f"init_from {a['init_from']!r} does not exist (an image-phase SR checkpoint)")
        if a["init_from"] and not (a["stage"] == "spatiotemporal" and a["phase"] == "video"):
            raise MakeAVideoConfigError("init_from loads the image phase into SR_l^t's video phase: "
                                        "set stage: spatiotemporal, phase: video")
        if not a["spatial_lr_scale"] >= 0:
            raise MakeAVideoConfigError(f"spatial_lr_scale must be >= 0, got {a['spatial_lr_scale']}")
        if a["stage"] == "spatiotemporal" and a["phase"] == "video" and a["num_frames"] < 2:
            raise MakeAVideoConfigError(f"SR_l^t's video phase trains on clips: data.num_frames must be >= 2, "
                                        f"got {a['num_frames']}")
        _check_unet(a["unet"], a["resolution"], _diffusion_args(a), cond_in_channels=3, noise_aug_cond=True)
        res = a["resolution"][0] if isinstance(a["resolution"], (list, tuple)) else a["resolution"]
        if res % a["scale_factor"]:
            raise MakeAVideoConfigError(f"resolution {res} is not divisible by scale_factor {a['scale_factor']}")

    # -- conditioning ------------------------------------------------------------------------------------------------
    def aug_timesteps(self, n: int, train: bool, generator: torch.Generator | None = None,
                      level: float | None = None) -> Tensor:
        """Noise-augmentation timesteps ``[n]``: uniform up to ``noise_aug_max`` in training, else ``level``."""
        steps = self.diffusion.num_timesteps
        if train:
            high = max(1, int(round(self.hparams.noise_aug_max * (steps - 1))) + 1)
            return randint(high, n, generator, self.device)
        lvl = self.hparams.sample_aug_level if level is None else level
        return torch.full((n,), int(round(lvl * (steps - 1))), dtype=torch.long, device=self.device)

    def condition(self, low: Tensor, size: tuple[int, int], aug_t: Tensor, aug_noise: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
        """The U-Net's conditioning channels: ``low`` bilinearly upsampled to ``size`` and noised to level ``aug_t``
        (``q(x_s | up(low))``; ``aug_t == 0`` is the upsampled input itself)."""
        up = upsample_bilinear(low.float(), size)
        if aug_noise is None:
            aug_noise = randn(up.shape, generator, up.device)
        noised = self.diffusion.q_sample(up, aug_t, aug_noise.to(up.device))
        return torch.where(rearrange(aug_t == 0, "b -> b" + " 1" * (up.ndim - 1)), up, noised)

    def model_inputs(self, batch: Mapping[str, Any], train: bool,
                     generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        """(x0 = high-resolution frames or clips, ``{"x_cond", "aug_level"}``) from ``batch['video']``:
        SR_h and the image phase take frames as images (every frame for SR_h, one random frame per clip for SR_l's
        image phase), the video phase the clips."""
        video = batch["video"].to(self.device).float()
        if video.ndim == 5 and not self.temporal:
            if self.hparams.stage == "spatial":
                video = rearrange(video, "b c t h w -> (b t) c h w")
            else:
                idx = randint(video.shape[2], video.shape[0], generator, self.device)
                video = video[torch.arange(video.shape[0], device=self.device), :, idx]
        elif video.ndim == 4 and self.temporal:
            video = video[:, :, None]  # an image batch through the video network skips the temporal layers
        low = downsample(video, self.hparams.scale_factor)
        aug_t = self.aug_timesteps(video.shape[0], train, generator)
        return video, {"x_cond": self.condition(low, tuple(video.shape[-2:]), aug_t, generator=generator),
                       "aug_level": aug_t.float()}

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return self.unet(x, t, **kwargs)

    def configure_optimizers(self):
        hp = self.hparams
        return video_stage_adamw(self.unet, self.temporal, hp.lr, hp.spatial_lr_scale, hp.weight_decay)

    # -- sampling ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def upsample(self, low: Tensor, generator: torch.Generator | None = None, steps: int | str | None = None,
                 aug_level: float | None = None, frame_batch: int | None = None) -> Tensor:
        """Super-resolve ``low`` ``[B, 3, T, h, w]`` (or images ``[B, 3, h, w]``) to ``scale_factor`` x in [-1, 1]."""
        hp = self.hparams
        image = low.ndim == 4
        low = (low[:, :, None] if image else low).to(self.device).float()
        b, c, t, h, w = low.shape
        size = (h * hp.scale_factor, w * hp.scale_factor)
        steps = hp.sample_steps if steps is None else steps
        was = self.unet.training
        self.unet.eval()
        try:
            if hp.stage == "spatial":
                out = self._per_frame(low, size, generator, steps, aug_level,
                                      hp.frame_batch if frame_batch is None else frame_batch)
            else:
                aug_t = self.aug_timesteps(b, False, level=aug_level)
                x_cond = self.condition(low, size, aug_t, generator=generator)
                fn = (chunked_over_time(self.unet, hp.chunk_frames, hp.chunk_overlap)
                      if hp.chunk_frames and t > hp.chunk_frames else self.unet)
                shape = (b, c, t, *size)
                spec, x_start = self.start(steps, upsample_bilinear(low, size), generator)
                out = self.diffusion.sample(fn, shape, sampler=hp.sampler, steps=spec, generator=generator,
                                            model_kwargs={"x_cond": x_cond, "aug_level": aug_t.float()},
                                            noise=x_start, device=self.device)
        finally:
            self.unet.train(was)
        out = out.clamp(-1, 1)
        return out[:, :, 0] if image else out

    def start(self, steps: int | str, up: Tensor, generator: torch.Generator | None = None,
              noise: Tensor | None = None) -> tuple[int | str, Tensor | None]:
        """(the sampler's steps, its initial ``x``): ``(steps, noise)`` at ``sample_start`` 1 (``noise`` None: the
        sampler draws it); at ``1/k`` the respacing ``"steps,0,...,0"`` (k sections: every step in the first) and
        ``sqrt(a_t0) up + sqrt(1 - a_t0) noise`` at its top timestep ``t0``."""
        k = round(1 / self.hparams.sample_start)
        if k == 1:
            return steps, noise
        spec = ",".join([str(int(steps))] + ["0"] * (k - 1))
        t0 = int(self.diffusion.respaced(spec).timestep_map[-1])
        noise = randn(tuple(up.shape), generator, up.device) if noise is None else noise
        t = torch.full((up.shape[0],), t0, dtype=torch.long, device=up.device)
        return spec, self.diffusion.respaced("").q_sample(up.float(), t, noise.to(up.device))

    def _per_frame(self, low: Tensor, size: tuple[int, int], generator, steps, aug_level, frame_batch: int) -> Tensor:
        """SR_h: every frame alone, one initial noise (and aug noise) per clip shared by its frames (§1.1)."""
        b, c, t = low.shape[:3]
        per = (b,) if self.hparams.shared_noise else (b, t)
        noise = randn((*per, c, *size), generator, self.device)
        aug_noise = randn((*per, c, *size), generator, self.device)
        if self.hparams.shared_noise:
            noise, aug_noise = (repeat(n, "b c h w -> (b t) c h w", t=t) for n in (noise, aug_noise))
        else:
            noise, aug_noise = (rearrange(n, "b t c h w -> (b t) c h w") for n in (noise, aug_noise))
        frames = rearrange(low, "b c t h w -> (b t) c h w")
        n = frames.shape[0]
        step = frame_batch or n
        outs = []
        for s in range(0, n, step):
            sl = slice(s, min(n, s + step))
            aug_t = self.aug_timesteps(sl.stop - sl.start, False, level=aug_level)
            x_cond = self.condition(frames[sl], size, aug_t, aug_noise[sl])
            spec, x_start = self.start(steps, upsample_bilinear(frames[sl].float(), size), noise=noise[sl])
            outs.append(self.diffusion.sample(self.unet, (sl.stop - sl.start, c, *size), sampler=self.hparams.sampler,
                                              steps=spec, generator=generator, noise=x_start,
                                              model_kwargs={"x_cond": x_cond, "aug_level": aug_t.float()},
                                              device=self.device))
        return rearrange(torch.cat(outs), "(b t) c h w -> b c t h w", b=b)

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Reconstruct ``batch['video']`` (high resolution, [-1, 1]): downsample by ``scale_factor``, super-resolve."""
        if not batch or batch.get("video") is None:
            raise ValueError("super-resolution needs batch['video'] (the high-resolution clips it reconstructs)")
        video = batch["video"][:num_samples].to(self.device).float()
        video = video if video.ndim == 5 else video[:, :, None]
        return self.upsample(downsample(video, self.hparams.scale_factor), generator)

    def prediction_inputs(self) -> dict:
        return {"kind": "video"}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Super-resolve the predict clips as given (``batch['video']`` is the LOW-resolution input)."""
        g = torch.Generator().manual_seed(batch_idx * 100003 + self.global_rank)
        low = batch["video"]
        videos = self.upsample(low if low.ndim == 5 else low[:, :, None], generator=g)
        keys = list(batch.get("key") or [f"{batch_idx:05d}_{i:03d}" for i in range(len(videos))])
        return {"videos": videos, "keys": keys[: len(videos)], "cond_videos": low}
