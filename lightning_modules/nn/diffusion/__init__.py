"""Diffusion core shared by the diffusion-trained models (Latte, Tora, Make-A-Video), independent of any model.

``create_diffusion(DiffusionConfig(...))`` returns a ``GaussianDiffusion`` (ADM/DiT semantics) or a
``RectifiedFlow`` (Open-Sora v1.2); both follow the ``Diffusion`` protocol:
``training_losses(model_fn, x0, model_kwargs, t=None, noise=None, generator=None) -> {"loss": [B], ...}`` and
``sample(model_fn, shape, sampler, steps, cfg_scale, guided_channels, generator, progress, model_kwargs,
uncond_kwargs, noise, device) -> x0``.
"""

from .common import masked_mean_flat, mean_flat
from .config import Diffusion, DiffusionConfig, create_diffusion
from .flow import RectifiedFlow, opensora_timestep_shift, timestep_transform
from .gaussian import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    get_betas,
    linear_betas,
    normal_kl,
    space_timesteps,
)
from .guidance import classifier_free_guidance, combine_guidance, concat_kwargs, guided_channel_index

__all__ = [
    "Diffusion",
    "DiffusionConfig",
    "create_diffusion",
    "GaussianDiffusion",
    "RectifiedFlow",
    "linear_betas",
    "cosine_betas",
    "get_betas",
    "space_timesteps",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "timestep_transform",
    "opensora_timestep_shift",
    "classifier_free_guidance",
    "combine_guidance",
    "concat_kwargs",
    "guided_channel_index",
    "mean_flat",
    "masked_mean_flat",
]
