"""Rectified flow (Liu et al. 2022; flow matching) with Open-Sora v1.2's timestep sampling (spec latte_tora.md §3.2).

Time ``t`` lives in ``[0, T]`` (T = 1000) and is passed to the model as a FLOAT tensor; ``tau = t / T``.

- Path: ``x_t = (1 - tau) x0 + tau eps``; target velocity ``v = x0 - eps``, MSE on the first C output channels.
- Training t: ``T * sigmoid(n)``, ``n ~ N(loc, scale)`` ("logit-normal"), or uniform; then the resolution shift
  ``tau' = r tau / (1 + (r - 1) tau)`` with ``r = sqrt(H W / 512^2) * sqrt(T')`` (``opensora_timestep_shift``).
- Euler sampler: ``t_i = (1 - i/N) T`` (shifted the same way); ``z += v (t_i - t_{i+1}) / T``, the last step
  uses ``t_{N-1} / T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .common import masked_mean_flat, per_sample, progress_bar, randn, start_sampling
from .guidance import ChannelSpec

__all__ = ["timestep_transform", "opensora_timestep_shift", "RectifiedFlow"]

T_SAMPLING = ("logit-normal", "uniform")


def timestep_transform(t: Tensor, shift: float | Tensor, num_timesteps: int = 1000) -> Tensor:
    """Open-Sora's resolution-dependent shift: ``tau' = r tau / (1 + (r - 1) tau)``, ``tau = t / T``.

    ``shift`` (r): a float or a per-sample ``[B]`` tensor; r = 1 is the identity, r > 1 moves t towards noise.
    """
    tau = t.float() / num_timesteps
    r = shift if not isinstance(shift, Tensor) else shift.to(tau.device, torch.float32)
    return r * tau / (1 + (r - 1) * tau) * num_timesteps


def opensora_timestep_shift(
    height: float | Tensor, width: float | Tensor, num_frames: int | Tensor, base_resolution: int = 512 * 512
) -> Tensor:
    """``r = sqrt(H W / base_resolution) * sqrt(T')``, ``T' = 1`` for images else ``num_frames // 17 * 5``.

    ``height``/``width`` are the PIXEL size of the video, ``num_frames`` its pixel frame count (Open-Sora v1.2
    ``timestep_transform``). Scalars or per-sample tensors; returns float32.
    """
    h = torch.as_tensor(height, dtype=torch.float32)
    w = torch.as_tensor(width, dtype=torch.float32)
    f = torch.as_tensor(num_frames)
    frames = torch.where(f == 1, torch.ones_like(f), torch.div(f, 17, rounding_mode="floor") * 5).float()
    return torch.sqrt(h * w / base_resolution) * torch.sqrt(frames)


class RectifiedFlow:
    """Rectified-flow training and Euler sampling behind the same interface as ``GaussianDiffusion``.

    ``learn_sigma=True`` means the model emits 2C channels (e.g. STDiT3 ``pred_sigma``); only the first C are the
    velocity, the rest are ignored. ``timestep_shift``: the default r (1.0 = none); per call ``shift=`` overrides it.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        t_sampling: str = "logit-normal",
        loc: float = 0.0,
        scale: float = 1.0,
        timestep_shift: float = 1.0,
        learn_sigma: bool = False,
        channel_dim: int = 1,
        sample_steps: int = 30,
    ):
        if t_sampling not in T_SAMPLING:
            raise ValueError(f"flow t_sampling must be one of {T_SAMPLING}, got {t_sampling!r}")
        if sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        self.num_timesteps = num_timesteps
        self.t_sampling, self.loc, self.scale = t_sampling, loc, scale
        self.timestep_shift = timestep_shift
        self.learn_sigma = learn_sigma
        self.channel_dim = channel_dim
        self.sample_steps = sample_steps

    # -- path -----------------------------------------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t/T) x0 + (t/T) eps``."""
        tau = per_sample(t.float() / self.num_timesteps, x0.ndim)
        return (1 - tau) * x0 + tau * noise

    def velocity(self, output: Tensor, x_t: Tensor) -> Tensor:
        c = x_t.shape[self.channel_dim]
        expected = list(x_t.shape)
        expected[self.channel_dim] = 2 * c if self.learn_sigma else c
        if list(output.shape) != expected:
            raise ValueError(
                f"model output shape {tuple(output.shape)} != {tuple(expected)} "
                f"(learn_sigma={self.learn_sigma}, channel dim {self.channel_dim})"
            )
        return output.float().narrow(self.channel_dim, 0, c)

    def sample_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        shift: float | Tensor | None = None,
    ) -> Tensor:
        """Training timesteps (float, in [0, T]): logit-normal or uniform, then the shift."""
        if self.t_sampling == "logit-normal":
            t = torch.sigmoid(self.loc + self.scale * randn((batch,), generator, device)) * self.num_timesteps
        else:
            gen_device = generator.device if generator is not None else device
            t = torch.rand((batch,), generator=generator, device=gen_device).to(device) * self.num_timesteps
        shift = self.timestep_shift if shift is None else shift
        if not (isinstance(shift, (int, float)) and shift == 1.0):
            t = timestep_transform(t, shift, self.num_timesteps)
        return t

    def training_losses(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        shift: float | Tensor | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample ``loss`` = ``mse`` ``[B]`` of the velocity ``x0 - eps``, plus the (float) ``t`` used.

        ``mask`` (bool, broadcastable to x0, True = generated): elements where it is False get the clean x0 as input
        and are left out of the loss (Open-Sora ``x_mask`` / Tora image conditioning).
        """
        b = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(b, generator, x0.device, shift)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device).to(x0.dtype)
        x_t = self.add_noise(x0, noise, t)
        if mask is not None:
            x_t = torch.where(mask, x_t, x0)
        v = self.velocity(model_fn(x_t, t, **(model_kwargs or {})), x_t)
        mse = masked_mean_flat((v - (x0 - noise).float()) ** 2, mask)
        return {"loss": mse, "mse": mse, "t": t}

    # -- sampling -------------------------------------------------------------------------------------------------------
    def sampling_timesteps(
        self, steps: int, batch: int, device: torch.device | str | None = None, shift: float | Tensor | None = None
    ) -> list[Tensor]:
        """``t_i = (1 - i/N) T`` for ``i < N``, shifted, each as a ``[B]`` float tensor."""
        shift = self.timestep_shift if shift is None else shift
        out = []
        for i in range(steps):
            t = torch.full((batch,), (1.0 - i / steps) * self.num_timesteps, dtype=torch.float32, device=device)
            if not (isinstance(shift, (int, float)) and shift == 1.0):
                t = timestep_transform(t, shift, self.num_timesteps)
            out.append(t)
        return out

    @torch.inference_mode()
    def sample(
        self,
        model_fn: Callable[..., Tensor],
        shape: Sequence[int],
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float = 1.0,
        guided_channels: ChannelSpec = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        uncond_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        shift: float | Tensor | None = None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
    ) -> Tensor:
        """Euler integration of ``dx/dt`` from pure noise (t = T) to data (t = 0); returns x0 ``[shape]``.

        Frame conditioning (Open-Sora v1.2 with a 0/1 mask; Tora image conditioning): where ``known_mask`` (bool,
        broadcastable to ``shape``, True = generated) is False, ``x`` is the clean ``known`` at every step and is
        returned unchanged. The model is told which frames are given through its own kwargs (STDiT3 ``x_mask``).
        """
        if (known is None) != (known_mask is None):
            raise ValueError("frame conditioning needs both known (the clean latents) and known_mask (True = generate)")
        if (sampler or "euler") != "euler":
            raise ValueError(f"rectified flow samples with 'euler', got {sampler!r} ('ddpm'/'ddim' are Gaussian)")
        steps = self.sample_steps if steps is None else int(steps)
        fn, x = start_sampling(
            model_fn, shape, self.channel_dim, cfg_scale, uncond_kwargs, guided_channels, noise, generator, device
        )
        if isinstance(shift, Tensor):
            shift = shift.to(x.device)
        ts = self.sampling_timesteps(steps, x.shape[0], x.device, shift)
        if known is not None:
            known, known_mask = known.to(x.device, x.dtype), known_mask.to(x.device).bool()
            x = torch.where(known_mask, x, known)
        for i in progress_bar(range(steps), progress, "euler sampling"):
            t = ts[i]
            v = self.velocity(fn(x, t, **(model_kwargs or {})), x)
            dt = (t - ts[i + 1]) if i < steps - 1 else t
            x = x + v * per_sample(dt / self.num_timesteps, x.ndim)
            if known is not None:
                x = torch.where(known_mask, x, known)
            if callback is not None:
                callback(i, x, v)
        return x
