"""Make-A-Video ↑F, masked frame interpolation and extrapolation (Singer et al. 2022, §3.3; spec
make_a_video_videopoet.md §1.1 row 4, §1.4, §1.5).

↑F is D^t fine-tuned with **4 extra input channels**: the masked RGB video (masked frames zero) and one binary mask
channel marking which frames are masked. Their input weights start at zero (``UNetConfig.cond_in_channels``), and the
frame-skip embedding starts at zero too (``UNetConfig.skip_cond``), so at initialisation ↑F is D^t on the noisy
channels. Trained on video only, with variable frame skips and fps conditioning; the mask kinds:

* interpolation (``interpolation_mask``): every ``skip``-th frame given, the ``skip - 1`` frames between masked; a
  clip of ``n`` frames becomes ``(n - 1) * skip + 1`` frames (16 -> 76 at skip 5, the paper's setting);
* extrapolation (``extrapolation_mask``): the first (or last) frames given, the rest masked (future / past);
* image animation (``animation_mask``): one frame given.

The kept frames pass through: sampling returns them unchanged (``MaskedFrameInterpolation.fill``); with
``replace_given`` they also enter the noisy input at every sampling step, noised along one DDIM trajectory (as in
training, where the noisy input is the real clip). ``t_power < 1`` draws the training timesteps towards high noise,
where the masked frames can only come from the given ones (both options off by default; the demo's measurements are
in ``vidgen/demos/make_a_video.py``, ``INTERP``). ``cond_fill: linear`` fills the masked frames of the
conditioning video with the linear blend of the given frames around them instead of zeros (NOT in the paper, which
zero-pads; the mask channel is unchanged, and the zero-init input weights keep ↑F at init equal to D^t). Conditioning on
y_e is inherited from D^t [unverified; the paper names only fps and frame skip]. The loss is averaged over the masked
frames (``loss_on: masked``; ``all`` averages over every frame) [unverified]. ``target: residual`` diffuses the
clip minus the linear blend of its given frames (``blend_given``) and adds the blend back after sampling, so a net
whose x0 estimate is zero returns the blend (NOT in the paper, which diffuses the clip itself; ``target: clip``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from einops import rearrange, repeat
from torch import Tensor

from vidgen.lightning_modules.clip import pick_frames
from vidgen.lightning_modules.make_a_video import (CLIPConditionedDiffusion, MakeAVideoConfigError, _check_clip, _clip,
                                                   _defaults, _diffusion_args, _frozen, unet_state_dict)
from vidgen.lightning_modules.nn.checkpoint import KeyReport
from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion
from vidgen.lightning_modules.nn.diffusion.common import randn
from vidgen.lightning_modules.nn.optim import cpu_multi_tensor
from vidgen.lightning_modules.nn.step_logs import log_step
from vidgen.lightning_modules.nn.unet import (PseudoAttention3d, ResBlock, UNet, UNET_SIZES, UNetConfigError,
                                              unet_config)

__all__ = ["MASK_KINDS", "interpolated_length", "interpolation_mask", "extrapolation_mask", "animation_mask",
           "masked_frames", "blend_given", "spread_frames", "MaskedFrameInterpolation"]

MASK_KINDS = ("interpolation", "extrapolation", "animation")


# ----------------------------------------------------------------------------------------------------------------------
# Masks (§1.4). A mask is bool [T], True where the frame is GIVEN (kept); the mask channel fed to the U-Net is its
# complement (1 on masked frames, "a binary mask channel marking which frames are masked").
# ----------------------------------------------------------------------------------------------------------------------
def interpolated_length(num_frames: int, skip: int) -> int:
    """Frames after interpolating ``num_frames`` at frame skip ``skip``: ``(n - 1) * skip + 1`` (16 -> 76 at 5)."""
    if num_frames < 1 or skip < 1:
        raise ValueError(f"need num_frames >= 1 and skip >= 1, got {num_frames}, {skip}")
    return (num_frames - 1) * skip + 1


def interpolation_mask(num_kept: int, skip: int) -> Tensor:
    """Interpolation: bool ``[(n - 1) * skip + 1]``, True at every ``skip``-th frame (the given ones)."""
    keep = torch.zeros(interpolated_length(num_kept, skip), dtype=torch.bool)
    keep[::skip] = True
    return keep


def extrapolation_mask(num_frames: int, num_given: int, direction: Literal["future", "past"] = "future") -> Tensor:
    """Extrapolation: the first ``num_given`` frames given and the rest masked (``future``), or the last (``past``)."""
    if not 1 <= num_given < num_frames:
        raise ValueError(f"extrapolation needs 1 <= num_given < num_frames, got {num_given} of {num_frames}")
    keep = torch.zeros(num_frames, dtype=torch.bool)
    if direction == "future":
        keep[:num_given] = True
    elif direction == "past":
        keep[num_frames - num_given:] = True
    else:
        raise ValueError(f"direction must be 'future' or 'past', got {direction!r}")
    return keep


def animation_mask(num_frames: int, frame: int = 0) -> Tensor:
    """Image animation: one given frame (the first by default), every other frame masked."""
    keep = torch.zeros(num_frames, dtype=torch.bool)
    keep[frame] = True
    return keep


def spread_frames(video: Tensor, skip: int) -> tuple[Tensor, Tensor]:
    """``[B, C, n, H, W]`` -> (``[B, C, (n-1)*skip+1, H, W]`` with the frames at every ``skip``-th position and zeros
    between, the interpolation mask ``[T]``)."""
    b, c, n, h, w = video.shape
    keep = interpolation_mask(n, skip).to(video.device)
    out = video.new_zeros(b, c, keep.numel(), h, w)
    out[:, :, keep] = video
    return out, keep


def blend_given(video: Tensor, keep: Tensor) -> Tensor:
    """``video`` ``[B, C, T, H, W]`` with every masked frame replaced by the linear blend of the nearest given frames
    before and after it (weights by temporal distance); a masked frame with a given frame on one side only (extrapolation,
    animation) copies that frame. ``keep``: bool ``[T]`` or ``[B, T]``, True on given frames (at least one per clip)."""
    t = video.shape[2]
    keep = keep.to(video.device)
    k = (keep[None] if keep.ndim == 1 else keep).expand(video.shape[0], -1)
    if not bool(k.any(1).all()):
        raise ValueError("blend_given needs at least one given frame per clip")
    pos = torch.arange(t, device=video.device).expand_as(k)
    big = t + 1
    # index of the last given frame at or before each frame / the first at or after (-1 / big where there is none)
    prev = torch.cummax(torch.where(k, pos, torch.full_like(pos, -1)), dim=1).values
    nxt = torch.flip(torch.cummin(torch.flip(torch.where(k, pos, torch.full_like(pos, big)), [1]), dim=1).values, [1])
    prev_ok, next_ok = prev >= 0, nxt < big
    p, n = torch.where(prev_ok, prev, nxt), torch.where(next_ok, nxt, prev)  # one side missing: both ends the same frame
    span = (n - p).clamp(min=1).to(video.dtype)
    a = torch.where(n > p, (pos - p).to(video.dtype) / span, torch.zeros_like(span))  # weight of the frame after
    gather = lambda idx: torch.gather(video, 2, repeat(idx, "b t -> b c t h w", c=video.shape[1],  # noqa: E731
                                                       h=video.shape[3], w=video.shape[4]))
    a = rearrange(a, "b t -> b 1 t 1 1")
    return (1 - a) * gather(p) + a * gather(n)


def masked_frames(video: Tensor, keep: Tensor, fill: Literal["zeros", "linear"] = "zeros") -> Tensor:
    """↑F's 4 conditioning channels ``[B, 4, T, H, W]``: the video with masked frames zeroed (3) and the mask channel,
    1 on masked frames (1). ``keep``: bool ``[T]`` or ``[B, T]``, True on given frames. ``fill='linear'`` puts the
    linear blend of the given frames around each masked frame there instead of zeros (``blend_given``; not in the
    paper, which zero-pads); the mask channel is the same either way."""
    keep = keep.to(video.device)
    k = (keep[None] if keep.ndim == 1 else keep).expand(video.shape[0], -1)
    k = rearrange(k.to(video.dtype), "b t -> b 1 t 1 1")
    if fill == "zeros":
        masked = video * k
    elif fill == "linear":
        masked = blend_given(video, keep)
    else:
        raise ValueError(f"fill must be 'zeros' or 'linear', got {fill!r}")
    return torch.cat([masked, (1 - k).expand(-1, 1, -1, *video.shape[-2:])], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------
class MaskedFrameInterpolation(CLIPConditionedDiffusion):
    """↑F (§1.4): D^t with 4 zero-initialised extra input channels (masked RGB + mask) and frame-skip conditioning.

    Args:
        unet: ``UNetConfig`` fields of D^t (``size`` picks a row of ``UNET_SIZES``); ``temporal``, ``fps_cond``,
            ``skip_cond``, ``cond_in_channels=4`` and ``cond_dim`` are set here.
        clip: the frozen CLIP with both towers (y_e of ``cond_frame`` conditions a training clip, as in D^t).
        init_from: a D^t checkpoint (``MakeAVideoDecoder`` stage 'video'): loaded with the input convolution widened
            (the 4 new input columns stay zero) and the frame-skip embedding at zero -> ↑F at init == D^t.
        frame_skips: the skips drawn per training batch for interpolation (variable frame skip, §1.4).
        masks: probability per mask kind (interpolation / extrapolation / animation), drawn per training batch.
        loss_on: 'masked' (average the eps-MSE over masked frames) or 'all' [unverified].
        num_frames, resolution: the training clips (linked from data); interpolation crops the clip to
            ``(n - 1) * skip + 1`` frames for the drawn skip.
        sample_skip: the skip ``generate`` interpolates with (5: 16 -> 76 frames). sample_fps: the fps of the INPUT
            clip when a batch gives none; ↑F is conditioned on the output fps = input fps x skip.
        replace_given: sampling also puts the given frames into the noisy input: at every step the U-Net sees them
            as ``q(x_t | given) = sqrt(a_t) x + sqrt(1 - a_t) eps`` (one ``eps`` per sample, the DDIM trajectory of
            the known frames) instead of its own running estimate of them, as in training, where the noisy input
            is the real clip given frames included ("replacement", Ho et al. 2022 Video Diffusion Models §3.1
            [unverified for MAV: the paper names only the mask channels]). Gaussian diffusion only.
        cond_fill: 'zeros' (the paper: masked frames zero-padded) or 'linear' (``blend_given``: the blend of the
            given frames around each masked frame) in the masked-RGB conditioning [not in the paper].
        target: 'clip' (the paper: the diffusion generates the clip) or 'residual' (it generates the clip minus
            ``blend_given`` of its given frames, and sampling adds that blend back: the given frames' residual is
            zero, and an x0 estimate of zero returns the linear blend: with ``diffusion.predict: x0`` a network that
            outputs zero samples exactly the blend) [not in the paper].
        t_power: training timesteps ``t = floor(T u^p)``, ``u ~ U(0, 1)`` (``training_timesteps``): 1 is the usual
            uniform draw; ``p < 1`` favours the high noise levels, where the masked frames can only come from the
            given ones and y_e (density ``∝ t^(1/p - 1)``: 0.5 -> linear in t, mean 2T/3) [unverified: a
            training-budget choice, not the paper's].
        diffusion, sampler, sample_steps, cfg_scale, cond_drop_prob, cond_frame: as ``MakeAVideoDecoder``.
    """

    fsdp_block_classes = (ResBlock, PseudoAttention3d)
    denoiser_name = "unet"

    def __init__(
        self,
        unet: dict | None = None,
        clip: dict | None = None,
        init_from: str | None = None,
        num_frames: int = 16,
        resolution: int = 64,
        frame_skips: list[int] = (1, 2, 3, 4, 5),
        masks: dict[str, float] | None = None,
        loss_on: Literal["masked", "all"] = "masked",
        cond_frame: Literal["first", "middle", "last", "random"] = "first",
        cond_drop_prob: float = 0.1,
        diffusion: dict | None = None,
        sampler: Literal["ddpm", "ddim"] = "ddim",
        sample_steps: int | str = 64,
        cfg_scale: float = 1.0,
        sample_skip: int = 5,
        sample_fps: float = 4.0,
        replace_given: bool = False,
        t_power: float = 1.0,
        cond_fill: Literal["zeros", "linear"] = "zeros",
        target: Literal["clip", "residual"] = "clip",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.validate_config(dict(self.hparams))
        clip_model = _clip(clip)
        _frozen(self, "clip", clip_model)
        ucfg = dict(unet or {})
        size = ucfg.pop("size", None)
        self.unet_config = unet_config(size, **{**ucfg, "temporal": True, "fps_cond": True, "skip_cond": True,
                                                "cond_in_channels": 4, "cond_dim": clip_model.embed_dim})
        self.unet = UNet(self.unet_config)
        self.diffusion = create_diffusion(DiffusionConfig(**_diffusion_args(self.hparams)))
        m = dict(masks or {"interpolation": 0.7, "extrapolation": 0.2, "animation": 0.1})
        self.mask_kinds, probs = list(m), torch.tensor(list(m.values()), dtype=torch.float)
        self.mask_probs = probs / probs.sum()
        self.load_report: KeyReport | None = None
        if init_from:
            self.load_report = r = self.unet.load_pretrained(unet_state_dict(init_from), source=init_from,
                                                             kind="D^t -> ↑F")
            print(f"[make_a_video] D^t -> ↑F: loaded {len(r.loaded)} tensors from {init_from}; "
                  f"{len(r.missing)} frame-skip tensors start at zero, 4 new input channels at zero", flush=True)

    @classmethod
    def validate_config(cls, args: Mapping[str, Any]) -> None:
        a = {**_defaults(cls), **dict(args)}
        _check_clip(a["clip"])
        masks = dict(a["masks"] or {"interpolation": 1.0})
        bad = [k for k in masks if k not in MASK_KINDS]
        if bad or not masks or any(v < 0 for v in masks.values()) or sum(masks.values()) <= 0:
            raise MakeAVideoConfigError(f"interpolation masks {masks}: keys from {MASK_KINDS} with probabilities >= 0 "
                                        "and a positive sum")
        skips = list(a["frame_skips"])
        if not skips or any(int(k) < 1 for k in skips):
            raise MakeAVideoConfigError(f"frame_skips must be integers >= 1, got {skips}")
        if a["num_frames"] < 2:
            raise MakeAVideoConfigError(f"↑F trains on clips: data.num_frames must be >= 2, got {a['num_frames']}")
        too_long = [k for k in skips if k > a["num_frames"] - 1]
        if too_long:
            raise MakeAVideoConfigError(f"frame_skips {too_long} leave fewer than 2 given frames in a "
                                        f"{a['num_frames']}-frame clip: drop them or raise data.num_frames")
        if a["sample_skip"] < 1:
            raise MakeAVideoConfigError(f"sample_skip must be >= 1, got {a['sample_skip']}")
        if a["replace_given"] and (a.get("diffusion") or {}).get("process", "gaussian") != "gaussian":
            raise MakeAVideoConfigError("replace_given noises the given frames with the Gaussian schedule: "
                                        "set replace_given: false for diffusion.process: flow")
        if not 0 < a["t_power"] <= 1:
            raise MakeAVideoConfigError(f"t_power must be in (0, 1] (1: uniform timesteps), got {a['t_power']}")
        if a["cond_fill"] not in ("zeros", "linear"):
            raise MakeAVideoConfigError(f"cond_fill must be 'zeros' (the paper) or 'linear', got {a['cond_fill']!r}")
        if a["target"] not in ("clip", "residual"):
            raise MakeAVideoConfigError(f"target must be 'clip' (the paper) or 'residual', got {a['target']!r}")
        if a["loss_on"] not in ("masked", "all"):
            raise MakeAVideoConfigError(f"loss_on must be 'masked' or 'all', got {a['loss_on']!r}")
        if not 0 <= a["cond_drop_prob"] < 1:
            raise MakeAVideoConfigError(f"cond_drop_prob must be in [0, 1), got {a['cond_drop_prob']}")
        if a["cfg_scale"] != 1.0 and a["cond_drop_prob"] <= 0:
            raise MakeAVideoConfigError("cfg_scale != 1 needs the null embedding: set cond_drop_prob > 0 (0.1)")
        if a["init_from"] and not os.path.isfile(a["init_from"]):
            raise MakeAVideoConfigError(f"init_from {a['init_from']!r} does not exist (a D^t checkpoint)")
        _check_unet(a["unet"], a["resolution"], _diffusion_args(a))

    # -- data --------------------------------------------------------------------------------------------------------
    def draw_mask(self, num_frames: int, generator: torch.Generator | None = None) -> tuple[str, int, int, Tensor]:
        """(kind, frame skip, first frame, keep mask ``[T']``) for one training batch of ``num_frames``-frame clips."""
        kind = self.mask_kinds[int(torch.multinomial(self.mask_probs, 1, generator=generator))]
        if kind == "interpolation":
            skips = [int(k) for k in self.hparams.frame_skips]
            skip = skips[int(torch.randint(len(skips), (1,), generator=generator))]
            length = interpolated_length((num_frames - 1) // skip + 1, skip)
            start = int(torch.randint(num_frames - length + 1, (1,), generator=generator))
            return kind, skip, start, interpolation_mask((num_frames - 1) // skip + 1, skip)
        if kind == "extrapolation":
            given = int(torch.randint(1, max(2, num_frames // 2 + 1), (1,), generator=generator))
            past = bool(torch.randint(2, (1,), generator=generator))
            return kind, 1, 0, extrapolation_mask(num_frames, min(given, num_frames - 1), "past" if past else "future")
        return kind, 1, 0, animation_mask(num_frames, 0)

    def model_inputs(self, batch: Mapping[str, Any], train: bool,
                     generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        """(x0 = the (cropped) clip, or its residual from the blend with ``target: residual``; U-Net kwargs incl. the
        masked conditioning and the loss mask)."""
        video = batch["video"].to(self.device)
        if video.ndim != 5 or video.shape[2] < 2:
            raise ValueError(f"↑F trains on clips [B, C, T>1, H, W], got {tuple(video.shape)}")
        _, skip, start, keep = self.draw_mask(video.shape[2], generator)
        x0 = video[:, :, start:start + keep.numel()]
        b = x0.shape[0]
        fps = batch.get("fps")
        fps = (fps.to(self.device).float() if fps is not None
               else torch.full((b,), self.hparams.sample_fps * skip, device=self.device))
        y_e = batch.get("image_embed")
        y_e = (y_e.to(self.device).float() if y_e is not None
               else self._clip_on_device().encode_image(pick_frames(x0, self.hparams.cond_frame)))
        p = self.hparams.cond_drop_prob if train else 0.0
        kw: dict[str, Any] = {"cond": y_e, "cond_drop": torch.rand(b, device=self.device) < p, "fps": fps,
                              "frame_skip": torch.full((b,), float(skip), device=self.device),
                              "x_cond": masked_frames(x0, keep, self.hparams.cond_fill)}
        if self.hparams.target == "residual":
            x0 = x0 - blend_given(x0, keep)
        if self.hparams.loss_on == "masked":
            kw["loss_mask"] = rearrange(~keep.to(self.device), "t -> 1 1 t 1 1")
        return x0, kw

    def training_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """``[n]`` training timesteps ``floor(T u^t_power)`` (None at ``t_power`` 1: the diffusion's uniform draw)."""
        p = float(self.hparams.t_power)
        if p == 1.0:
            return None
        steps = self.diffusion.num_timesteps
        u = torch.rand(n, generator=generator, device=generator.device if generator is not None else "cpu")
        return (steps * u.double() ** p).long().clamp(max=steps - 1).to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, kw = self.model_inputs(batch, train=True)
        mask = kw.pop("loss_mask", None)
        t = self.training_timesteps(x0.shape[0])
        loss = self.diffusion.training_losses(self.denoiser, x0, kw, t=t, mask=mask)["loss"].mean()
        log_step(self, {"train/loss": loss}, x0.shape[0])
        return loss

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return self.unet(x, t, **kwargs)

    def configure_optimizers(self):
        hp = self.hparams
        return cpu_multi_tensor(torch.optim.AdamW([p for p in self.unet.parameters() if p.requires_grad], lr=hp.lr,
                                                  weight_decay=hp.weight_decay))

    # -- sampling ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, video: Tensor, keep: Tensor, y_e: Tensor, fps: Tensor, frame_skip: float | Tensor = 1,
             generator: torch.Generator | None = None, steps: int | str | None = None,
             cfg_scale: float | None = None, noise: Tensor | None = None) -> Tensor:
        """Generate the masked frames of ``video`` ``[B, 3, T, H, W]`` (``keep`` bool ``[T]``: given frames); the
        given frames are returned unchanged. ``fps``: the output clip's fps ``[B]``; y_e ``[B, D]``."""
        hp = self.hparams
        b = video.shape[0]
        scale = hp.cfg_scale if cfg_scale is None else cfg_scale
        skip = torch.as_tensor(frame_skip, dtype=torch.float32, device=self.device).expand(b).clone()
        cond = {"cond": y_e.to(self.device).float(), "cond_drop": torch.zeros(b, dtype=torch.bool, device=self.device),
                "fps": fps.to(self.device).float(), "frame_skip": skip,
                "x_cond": masked_frames(video.to(self.device).float(), keep, hp.cond_fill)}
        uncond = {**cond, "cond_drop": torch.ones(b, dtype=torch.bool, device=self.device)}
        video = video.to(self.device).float()
        # target 'residual': the process runs on video - blend (zero on the given frames), the blend is added back
        base = blend_given(video, keep) if hp.target == "residual" else torch.zeros_like(video)
        model = self.unet
        if hp.replace_given:
            model = self._given_frames_in_x_t(video - base, keep, generator)
        was = self.unet.training
        self.unet.eval()
        try:
            x = self.diffusion.sample(model, tuple(video.shape), sampler=hp.sampler,
                                      steps=hp.sample_steps if steps is None else steps, cfg_scale=scale,
                                      generator=generator, model_kwargs=cond,
                                      uncond_kwargs=uncond if scale != 1.0 else None, noise=noise, device=self.device)
        finally:
            self.unet.train(was)
        k = rearrange(keep.to(self.device), "t -> 1 1 t 1 1")
        return torch.where(k, video, (base + x).clamp(-1, 1))

    def _given_frames_in_x_t(self, video: Tensor, keep: Tensor, generator: torch.Generator | None):
        """The U-Net with its noisy input's given frames replaced by ``q_sample(video, t, eps)`` of the diffusion core
        (``sqrt(a_t) video + sqrt(1 - a_t) eps``, ``t`` the original-schedule timestep the sampler feeds the model; one
        ``eps`` drawn here for the whole run)."""
        eps = randn(tuple(video.shape), generator, video.device)
        base = self.diffusion.respaced("")  # the unrespaced process: its index is the original timestep t
        k = rearrange(keep.to(video.device), "t -> 1 1 t 1 1")

        def fn(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
            r = x.shape[0] // video.shape[0]  # classifier-free guidance doubles the batch
            v, e = (repeat(z, "b ... -> (r b) ...", r=r) for z in (video, eps))
            return self.unet(torch.where(k, base.q_sample(v, t, e).to(x.dtype), x), t, **kwargs)

        return fn

    def interpolate(self, video: Tensor, skip: int, y_e: Tensor | None = None, fps: Tensor | None = None,
                    generator: torch.Generator | None = None, **kwargs: Any) -> Tensor:
        """``[B, 3, n, H, W]`` at ``fps`` -> ``[B, 3, (n-1)*skip+1, H, W]`` at ``fps * skip`` (16 -> 76 at skip 5)."""
        b = video.shape[0]
        if y_e is None:
            y_e = self._clip_on_device().encode_image(pick_frames(video.to(self.device), self.hparams.cond_frame))
        fps = (torch.full((b,), float(self.hparams.sample_fps), device=self.device) if fps is None
               else torch.as_tensor(fps, dtype=torch.float32, device=self.device).expand(b))
        full, keep = spread_frames(video.to(self.device).float(), skip)
        return self.fill(full, keep, y_e, fps * skip, skip, generator=generator, **kwargs)

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """``batch['video']`` interpolated at ``sample_skip`` (y_e of its ``cond_frame`` unless ``image_embed``)."""
        if not batch or batch.get("video") is None:
            raise ValueError("↑F interpolates given clips: generate() needs batch['video'] [B, 3, n, H, W]")
        video = batch["video"][:num_samples]
        y_e = batch.get("image_embed")
        return self.interpolate(video, int(self.hparams.sample_skip), None if y_e is None else y_e[:num_samples],
                                batch.get("fps"), generator)

    def prediction_inputs(self) -> dict:
        return {"kind": "video"}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        g = torch.Generator().manual_seed(batch_idx * 100003 + self.global_rank)
        videos = self.generate(batch, generator=g)
        keys = list(batch.get("key") or [f"{batch_idx:05d}_{i:03d}" for i in range(len(videos))])
        return {"videos": videos, "keys": keys[: len(videos)], "cond_videos": batch["video"][: len(videos)]}


def _check_unet(unet: Mapping | None, resolution: Any, diffusion: dict, **forced: Any) -> None:
    """U-Net / diffusion / resolution errors as one ``MakeAVideoConfigError`` line (shared by ↑F and the SR stages)."""
    ucfg = dict(unet or {})
    size = ucfg.pop("size", None)
    try:
        if size is not None and size not in UNET_SIZES:
            raise UNetConfigError(f"unet.size must be one of {sorted(UNET_SIZES)}, got {size!r}")
        u = unet_config(size, **{**ucfg, "temporal": True, **forced})
        DiffusionConfig(**diffusion)
    except (UNetConfigError, ValueError, TypeError) as e:
        raise MakeAVideoConfigError(f"{e}") from None
    res = resolution
    if isinstance(res, (list, tuple)):
        res = res[0] if len(res) == 2 and res[0] == res[1] else None
    if res is None or res % u.downsample_factor:
        raise MakeAVideoConfigError(f"resolution {resolution!r} must be square and divisible by "
                                    f"{u.downsample_factor} (the U-Net's down-sampling)")
