"""``DiffusionConfig`` + ``create_diffusion``: one entry point for every diffusion-trained model.

Latte / DiT: ``DiffusionConfig()`` (linear, 1000 steps, eps, learned sigma, hybrid loss), sampled with
``sample(..., sampler="ddpm", steps=250)``. Tora / STDiT3: ``DiffusionConfig(process="flow", learn_sigma=True)``
(Open-Sora ``rflow``, logit-normal t, 30 Euler steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .flow import T_SAMPLING, RectifiedFlow
from .gaussian import LOSSES, PREDICTIONS, GaussianDiffusion, space_timesteps

__all__ = ["Diffusion", "DiffusionConfig", "create_diffusion"]


@runtime_checkable
class Diffusion(Protocol):
    """What a LightningModule relies on. ``model_fn(x_t, t, **model_kwargs) -> output``."""

    num_timesteps: int

    def training_losses(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]: ...

    def sample(
        self,
        model_fn: Callable[..., Tensor],
        shape: Sequence[int],
        sampler: str | None = None,
        steps: Any = None,
        cfg_scale: float = 1.0,
        guided_channels: Any = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        uncond_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor: ...


@dataclass
class DiffusionConfig:
    """Diffusion process settings; ``None`` fields take the process' default (see ``resolved()``).

    process: 'gaussian' (ADM/DiT) or 'flow' (rectified flow, Open-Sora v1.2).
    schedule/steps/respacing: Gaussian betas ('linear' | 'cosine') over ``steps``; ``respacing`` ('', '250',
        'ddim50', '10,10,10') respaces the training process itself (DiT trains with '').
    predict: 'eps' | 'x0' | 'v' (Gaussian; default 'eps'); flow always predicts the velocity x0 - eps.
    learn_sigma: model emits 2C channels (Gaussian: learned-range variance; flow: the extra C are ignored).
    sigma_small: fixed variance beta~ instead of beta when learn_sigma is False (Gaussian).
    loss: 'hybrid' (L_simple + L_vlb, needs learn_sigma) | 'mse' | 'kl'; default 'hybrid' if learn_sigma else 'mse'.
    channel_dim: the channel axis of x (1 for [B, C, T, H, W]; Latte's official layout uses 2).
    sampler: 'ddpm' | 'ddim' (Gaussian) or 'euler' (flow). sample_steps: default sampling steps
        (Gaussian: None = the process' own steps, an int = even respacing; flow: 30). eta: DDIM eta.
    clip_denoised: clamp predicted x0 to [-1, 1] while sampling (False for latents, as Latte/DiT).
    flow_t_sampling/flow_loc/flow_scale: training t distribution; flow_shift: default resolution shift r.
    """

    process: str = "gaussian"
    schedule: str = "linear"
    steps: int = 1000
    predict: str | None = None
    learn_sigma: bool = True
    sigma_small: bool = False
    respacing: str = ""
    loss: str | None = None
    channel_dim: int = 1
    sampler: str | None = None
    sample_steps: int | str | None = None
    eta: float = 0.0
    clip_denoised: bool = False
    flow_t_sampling: str = "logit-normal"
    flow_loc: float = 0.0
    flow_scale: float = 1.0
    flow_shift: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def resolved(self) -> DiffusionConfig:
        """A copy with the ``None`` defaults filled in."""
        gaussian = self.process == "gaussian"
        return replace(
            self,
            predict=self.predict or ("eps" if gaussian else "velocity"),
            loss=self.loss or ("hybrid" if gaussian and self.learn_sigma else "mse"),
            sampler=self.sampler or ("ddpm" if gaussian else "euler"),
            sample_steps=self.sample_steps if self.sample_steps is not None or gaussian else 30,
        )

    def validate(self) -> None:
        """Raise a ValueError naming the field and the fix; run before any work starts."""
        if self.process not in ("gaussian", "flow"):
            raise ValueError(f"DiffusionConfig.process must be 'gaussian' or 'flow', got {self.process!r}")
        if self.steps < 2:
            raise ValueError(f"DiffusionConfig.steps must be >= 2, got {self.steps}")
        if self.channel_dim < 1:
            raise ValueError(f"DiffusionConfig.channel_dim must be >= 1 (dim 0 is the batch), got {self.channel_dim}")
        if self.process == "gaussian":
            if self.schedule not in ("linear", "cosine", "squaredcos_cap_v2"):
                raise ValueError(f"DiffusionConfig.schedule must be 'linear' or 'cosine', got {self.schedule!r}")
            if self.predict is not None and self.predict not in PREDICTIONS:
                raise ValueError(f"DiffusionConfig.predict must be one of {PREDICTIONS}, got {self.predict!r}")
            loss = self.loss or ("hybrid" if self.learn_sigma else "mse")
            if loss not in LOSSES:
                raise ValueError(f"DiffusionConfig.loss must be one of {LOSSES}, got {loss!r}")
            if loss == "hybrid" and not self.learn_sigma:
                raise ValueError("DiffusionConfig: loss='hybrid' needs learn_sigma=True; with fixed variances use loss='mse'")
            if loss == "mse" and self.learn_sigma:
                raise ValueError(
                    "DiffusionConfig: learn_sigma=True needs loss='hybrid' (the variance is trained only by the VLB); "
                    "set learn_sigma=False for a plain MSE model"
                )
            if self.sampler is not None and self.sampler not in ("ddpm", "ddim"):
                raise ValueError(f"DiffusionConfig.sampler for process='gaussian' is 'ddpm' or 'ddim', got {self.sampler!r}")
            try:
                space_timesteps(self.steps, self.respacing)
                if self.sample_steps is not None:
                    space_timesteps(self.steps, str(self.sample_steps))
            except ValueError as e:
                raise ValueError(f"DiffusionConfig respacing/sample_steps: {e}") from e
            if not 0.0 <= self.eta <= 1.0:
                raise ValueError(f"DiffusionConfig.eta must be in [0, 1], got {self.eta}")
        else:
            if self.predict not in (None, "velocity", "v"):
                raise ValueError(f"process='flow' predicts the velocity x0 - eps; leave predict unset (got {self.predict!r})")
            if self.loss not in (None, "mse"):
                raise ValueError(f"process='flow' trains with loss='mse', got {self.loss!r}")
            if self.sampler not in (None, "euler"):
                raise ValueError(f"process='flow' samples with 'euler', got {self.sampler!r}")
            if self.respacing:
                raise ValueError("process='flow' has no respacing; set sample_steps instead")
            if self.flow_t_sampling not in T_SAMPLING:
                raise ValueError(f"DiffusionConfig.flow_t_sampling must be one of {T_SAMPLING}, got {self.flow_t_sampling!r}")
            if self.sample_steps is not None and not (isinstance(self.sample_steps, int) and self.sample_steps >= 1):
                raise ValueError(f"process='flow' needs an int sample_steps >= 1, got {self.sample_steps!r}")
            if self.flow_shift <= 0:
                raise ValueError(f"DiffusionConfig.flow_shift must be > 0, got {self.flow_shift}")


def create_diffusion(config: DiffusionConfig | dict[str, Any] | None = None, **overrides: Any) -> GaussianDiffusion | RectifiedFlow:
    """Build the process from a config (a ``DiffusionConfig``, a dict of its fields, or keyword overrides)."""
    if config is None:
        config = DiffusionConfig(**overrides)
    elif isinstance(config, dict):
        config = DiffusionConfig(**{**config, **overrides})
    elif overrides:
        config = DiffusionConfig(**{**asdict(config), **overrides})
    cfg = config.resolved()
    if cfg.process == "flow":
        return RectifiedFlow(
            num_timesteps=cfg.steps,
            t_sampling=cfg.flow_t_sampling,
            loc=cfg.flow_loc,
            scale=cfg.flow_scale,
            timestep_shift=cfg.flow_shift,
            learn_sigma=cfg.learn_sigma,
            channel_dim=cfg.channel_dim,
            sample_steps=cfg.sample_steps,
        )
    return GaussianDiffusion.from_schedule(
        cfg.schedule,
        cfg.steps,
        cfg.respacing,
        predict=cfg.predict,
        learn_sigma=cfg.learn_sigma,
        sigma_small=cfg.sigma_small,
        loss=cfg.loss,
        channel_dim=cfg.channel_dim,
        sampler=cfg.sampler,
        sample_steps=cfg.sample_steps,
        eta=cfg.eta,
        clip_denoised=cfg.clip_denoised,
    )
