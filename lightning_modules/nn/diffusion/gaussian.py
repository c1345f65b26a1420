"""Gaussian diffusion with the ADM/DiT ``GaussianDiffusion`` + ``SpacedDiffusion`` semantics (spec latte_tora.md §2).

- Schedules in float64: linear ``beta_t = linspace(1e-4 k, 0.02 k, T)``, ``k = 1000/T`` (Ho et al. 2020) or the
  cosine ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999).
- Predictions: eps (default), x0, or v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022).
- Learned range variance (Nichol & Dhariwal 2021, Eq. 15): the model emits 2C channels ``[mean, v]``,
  ``log sigma^2 = frac log beta_t + (1-frac) log beta~_t``, ``frac = (v+1)/2``, v not squashed.
- Hybrid loss ``L_simple + L_vlb`` with a stop-gradient on the mean inside L_vlb (Eq. 16); L_vlb in bits:
  KL for t > 0, discretized Gaussian decoder NLL at t = 0.
- Respacing ``"250"``, ``"ddim50"``, ``"10,10,10"`` (``space_timesteps``): betas recomputed from the kept
  cumulative alphas, and the model is fed the ORIGINAL timestep ``timestep_map[t]``.
- Samplers: ancestral DDPM and DDIM(eta), seeded with a ``torch.Generator``, under ``torch.inference_mode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import masked_mean_flat, mean_flat, per_sample, progress_bar, randint, randn, start_sampling
from .guidance import ChannelSpec

__all__ = [
    "linear_betas",
    "cosine_betas",
    "get_betas",
    "space_timesteps",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "GaussianDiffusion",
]

PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("hybrid", "mse", "kl")
SAMPLERS = ("ddpm", "ddim")


# ----------------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------------------------------------
def linear_betas(steps: int) -> np.ndarray:
    """Ho et al. linear schedule extended to any T: ``linspace(1e-4 * 1000/T, 0.02 * 1000/T, T)`` (float64)."""
    scale = 1000.0 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal cosine schedule: ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2``, betas capped."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)], dtype=np.float64
    )


def get_betas(schedule: str, steps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(steps)
    if schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(steps)
    raise ValueError(f"unknown noise schedule {schedule!r}; use 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Kept timesteps (sorted) of the ADM respacing rule.

    ``"ddimN"``: the integer stride ``s`` with ``len(range(0, T, s)) == N`` (``range(0, T, s)``).
    Otherwise comma-separated counts: T is cut into equal sections (the first ``T % n`` one step longer) and each
    section of ``size`` steps keeps ``count`` steps at ``start + round(i * (size-1)/(count-1))`` (Python ``round``).
    ``""`` keeps every step.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec == "":
            return list(range(num_timesteps))
        if spec.startswith("ddim"):
            desired = int(spec[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride")
        try:
            section_counts = [int(x) for x in spec.split(",")]
        except ValueError as e:
            raise ValueError(
                f"bad timestep respacing {spec!r}: use '', 'N', 'ddimN' or comma-separated counts like '10,10,10'"
            ) from e
    counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


# ----------------------------------------------------------------------------------------------------------------------
# Likelihood terms
# ----------------------------------------------------------------------------------------------------------------------
def normal_kl(mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float) -> Tensor:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` elementwise, in nats."""
    ref = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (x if isinstance(x, Tensor) else torch.tensor(x).to(ref) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """``Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (ADM's approximation)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability (nats) of the bin ``[x - 1/255, x + 1/255]`` under ``N(means, e^(2 log_scales))``.

    The edge bins are open: ``x < -0.999`` uses ``log Phi(upper)``, ``x > 0.999`` uses ``log(1 - Phi(lower))``.
    Probabilities are clamped at 1e-12 before the log (ADM ``discretized_gaussian_log_likelihood``).
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ----------------------------------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """Discrete-time Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021), ADM/DiT semantics.

    ``betas``: the process' betas (already respaced when ``timestep_map`` is given); ``base_betas``: the original
    schedule that ``respaced()`` and ``sample(steps=...)`` respace from. ``model_fn(x_t, t, **model_kwargs)`` always
    receives ``timestep_map[t]`` (int64), i.e. original-schedule timesteps.
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        predict: str = "eps",
        learn_sigma: bool = True,
        sigma_small: bool = False,
        loss: str = "hybrid",
        channel_dim: int = 1,
        timestep_map: Sequence[int] | None = None,
        base_betas: np.ndarray | None = None,
        respacing: str = "",
        sampler: str = "ddpm",
        sample_steps: int | str | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ):
        if predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {PREDICTIONS}, got {predict!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if loss == "hybrid" and not learn_sigma:
            raise ValueError("loss='hybrid' trains learned variances through the VLB; with learn_sigma=False use loss='mse'")
        if loss == "mse" and learn_sigma:
            raise ValueError("learn_sigma=True needs loss='hybrid' (or 'kl'): the variance channels are trained only by the VLB")
        if sampler not in SAMPLERS:
            raise ValueError(f"Gaussian diffusion samplers are {SAMPLERS}, got {sampler!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1]")
        self.predict, self.learn_sigma, self.sigma_small, self.loss = predict, learn_sigma, sigma_small, loss
        self.channel_dim = channel_dim
        self.sampler, self.sample_steps, self.eta, self.clip_denoised = sampler, sample_steps, eta, clip_denoised
        self.betas = betas
        self.num_timesteps = len(betas)
        self.base_betas = betas if base_betas is None else np.asarray(base_betas, dtype=np.float64)
        self.respacing = respacing
        self.timestep_map = torch.tensor(
            list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map), dtype=torch.long
        )
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per (respaced) timestep")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log clipped: the posterior variance is 0 at t = 0, so beta~_0 is replaced by beta~_1
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        fixed_large = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_variance, self.fixed_log_variance = (
            (self.posterior_variance, self.posterior_log_variance_clipped)
            if sigma_small
            else (fixed_large, np.log(fixed_large))
        )
        self._device_tables: dict[tuple[str, torch.device], Tensor] = {}
        self._respaced: dict[str, GaussianDiffusion] = {}

    # -- construction ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_schedule(
        cls, schedule: str = "linear", steps: int = 1000, respacing: str | Sequence[int] = "", **kwargs: Any
    ) -> GaussianDiffusion:
        base = get_betas(schedule, steps)
        return cls._spaced(base, respacing, **kwargs)

    @classmethod
    def _spaced(cls, base_betas: np.ndarray, respacing: str | Sequence[int], **kwargs: Any) -> GaussianDiffusion:
        use = space_timesteps(len(base_betas), respacing)
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        last, new_betas = 1.0, []
        for i in use:
            new_betas.append(1.0 - alphas_cumprod[i] / last)
            last = alphas_cumprod[i]
        spec = respacing if isinstance(respacing, str) else ",".join(map(str, respacing))
        return cls(np.array(new_betas), timestep_map=use, base_betas=base_betas, respacing=spec, **kwargs)

    def _settings(self) -> dict[str, Any]:
        return dict(
            predict=self.predict, learn_sigma=self.learn_sigma, sigma_small=self.sigma_small, loss=self.loss,
            channel_dim=self.channel_dim, sampler=self.sampler, sample_steps=self.sample_steps, eta=self.eta,
            clip_denoised=self.clip_denoised,
        )

    def respaced(self, respacing: str | int | Sequence[int]) -> GaussianDiffusion:
        """The same process respaced from the original schedule (``"250"``, ``"ddim50"``, ``"10,10,10"``, an int)."""
        key = str(respacing) if not isinstance(respacing, (list, tuple)) else ",".join(map(str, respacing))
        if key not in self._respaced:
            spec = str(respacing) if isinstance(respacing, int) else respacing
            self._respaced[key] = GaussianDiffusion._spaced(self.base_betas, spec, **self._settings())
        return self._respaced[key]

    # -- table lookup ---------------------------------------------------------------------------------------------------
    def _take(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """``self.<name>[t]`` as float32 ``[B, 1, ..., 1]`` on ``t``'s device (tables stay float64 until here)."""
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(np.asarray(getattr(self, name), dtype=np.float64)).to(t.device)
            self._device_tables[key] = table
        return per_sample(table[t].float(), ndim)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Respaced index -> original timestep fed to the model."""
        return self.timestep_map.to(t.device)[t]

    # -- forward process ------------------------------------------------------------------------------------------------
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of ``q(x_t | x_0)``."""
        n = x0.ndim
        mean = self._take("sqrt_alphas_cumprod", t, n) * x0
        var = self._take("alphas_cumprod", t, n)
        return mean, (1.0 - var).expand_as(x0), self._take("log_one_minus_alphas_cumprod", t, n).expand_as(x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``."""
        noise = torch.randn_like(x0) if noise is None else noise
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        n = x0.ndim
        return self._take("sqrt_alphas_cumprod", t, n) * x0 + self._take("sqrt_one_minus_alphas_cumprod", t, n) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        n = x_t.ndim
        mean = self._take("posterior_mean_coef1", t, n) * x0 + self._take("posterior_mean_coef2", t, n) * x_t
        var = self._take("posterior_variance", t, n).expand_as(x_t)
        log_var = self._take("posterior_log_variance_clipped", t, n).expand_as(x_t)
        return mean, var, log_var

    # -- parameterisations ----------------------------------------------------------------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        n = x_t.ndim
        return self._take("sqrt_recip_alphas_cumprod", t, n) * x_t - self._take("sqrt_recipm1_alphas_cumprod", t, n) * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        n = x_t.ndim
        return (self._take("sqrt_recip_alphas_cumprod", t, n) * x_t - x0) / self._take("sqrt_recipm1_alphas_cumprod", t, n)

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        n = x_t.ndim
        return self._take("sqrt_alphas_cumprod", t, n) * x_t - self._take("sqrt_one_minus_alphas_cumprod", t, n) * v

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``."""
        n = x0.ndim
        return self._take("sqrt_alphas_cumprod", t, n) * noise - self._take("sqrt_one_minus_alphas_cumprod", t, n) * x0

    def split_output(self, output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Model output -> (mean-parameter prediction, variance values or None)."""
        output = output.float()
        c = x_t.shape[self.channel_dim]
        expected = list(x_t.shape)
        expected[self.channel_dim] = 2 * c if self.learn_sigma else c
        if list(output.shape) != expected:
            what = f"2C={2 * c} channels (learn_sigma=True)" if self.learn_sigma else f"C={c} channels"
            raise ValueError(
                f"model output shape {tuple(output.shape)} != {tuple(expected)}: expected {what} on dim {self.channel_dim}"
            )
        if not self.learn_sigma:
            return output, None
        mean_out, var_out = torch.split(output, c, dim=self.channel_dim)
        return mean_out, var_out

    def p_mean_variance(
        self,
        output: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``p(x_{t-1} | x_t)`` from a raw model output: ``mean``, ``variance``, ``log_variance``, ``pred_xstart``."""
        n = x_t.ndim
        mean_out, var_out = self.split_output(output, x_t)
        if var_out is not None:
            min_log = self._take("posterior_log_variance_clipped", t, n)
            max_log = self._take("log_betas", t, n)
            frac = (var_out + 1) / 2  # nominally [-1, 1]; not squashed (ADM)
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._take("fixed_variance", t, n).expand_as(x_t)
            log_variance = self._take("fixed_log_variance", t, n).expand_as(x_t)
        if self.predict == "x0":
            pred_x0 = mean_out
        elif self.predict == "v":
            pred_x0 = self.predict_x0_from_v(x_t, t, mean_out)
        else:
            pred_x0 = self.predict_x0_from_eps(x_t, t, mean_out)
        if denoised_fn is not None:
            pred_x0 = denoised_fn(pred_x0)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_x0}

    def call_model(self, model_fn: Callable[..., Tensor], x_t: Tensor, t: Tensor, model_kwargs: dict | None) -> Tensor:
        return model_fn(x_t, self.model_timesteps(t), **(model_kwargs or {}))

    # -- losses ---------------------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """VLB term in bits per dim: ``KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))`` for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0.float(), out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses ``[B]``: ``loss``, ``mse`` (and ``vb`` with learned sigma), plus the sampled ``t`` (int64).

        ``t``: respaced indices ``[B]`` (uniform when None). ``mask`` (bool, broadcastable to x0): average ``mse``
        only where True (e.g. generated frames); ``vb`` is then averaged the same way.
        """
        b = x0.shape[0]
        if t is None:
            t = randint(self.num_timesteps, b, generator, x0.device)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, torch.float32).to(x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        terms: dict[str, Tensor] = {}
        output = self.call_model(model_fn, x_t, t, model_kwargs)
        if self.loss == "kl":
            terms["vb"] = self._vb(output, x0, x_t, t, mask)
            terms["loss"] = terms["vb"] * self.num_timesteps
            terms["t"] = t
            return terms
        mean_out, var_out = self.split_output(output, x_t)
        if var_out is not None:
            # Learn the variance through the VLB without letting it move the mean: stop-gradient on the mean part.
            frozen = torch.cat([mean_out.detach(), var_out], dim=self.channel_dim)
            terms["vb"] = self._vb(frozen, x0, x_t, t, mask)
        target = {"eps": noise, "x0": x0, "v": None}[self.predict]
        if target is None:
            target = self.v_target(x0, noise, t)
        terms["mse"] = masked_mean_flat((target.float() - mean_out) ** 2, mask)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        terms["t"] = t
        return terms

    def _vb(self, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return self.vb_terms_bpd(output, x0, x_t, t)["output"]
        # masked variant of vb_terms_bpd: per-element terms averaged over the masked elements
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        nll = -discretized_gaussian_log_likelihood(x0.float(), out["mean"], 0.5 * out["log_variance"])
        per_elem = torch.where(per_sample(t == 0, x0.ndim), nll, kl)
        return masked_mean_flat(per_elem, mask) / math.log(2.0)

    # -- sampling -------------------------------------------------------------------------------------------------------
    def for_steps(self, steps: int | str | None) -> GaussianDiffusion:
        """The process to sample with: ``None`` -> this one; an int ``n`` -> ``respaced(str(n))`` (DiT/Latte
        ``create_diffusion(str(n))``); a string -> that respacing of the original schedule."""
        if steps is None or (isinstance(steps, int) and steps == self.num_timesteps and self.respacing == ""):
            return self
        return self.respaced(steps)

    @torch.inference_mode()
    def sample(
        self,
        model_fn: Callable[..., Tensor],
        shape: Sequence[int],
        sampler: str | None = None,
        steps: int | str | None = None,
        cfg_scale: float = 1.0,
        guided_channels: ChannelSpec = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        uncond_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        eta: float | None = None,
        clip_denoised: bool | None = None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """Draw ``x0`` samples of ``shape`` with ancestral DDPM or DDIM(eta).

        ``steps``: None (this process), an int (even respacing, as DiT/Latte sampling) or a respacing string.
        ``cfg_scale``/``uncond_kwargs``: classifier-free guidance; ``guided_channels`` None guides all C latent
        channels (Latte), ``3`` reproduces DiT. ``callback(i, x_t, pred_x0)`` is called after every step.
        """
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"Gaussian diffusion samplers are {SAMPLERS}, got {sampler!r} ('euler' is for process='flow')")
        eta = self.eta if eta is None else eta
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        diff = self.for_steps(steps if steps is not None else self.sample_steps)
        fn, x = start_sampling(
            model_fn, shape, self.channel_dim, cfg_scale, uncond_kwargs, guided_channels, noise, generator, device
        )
        for i in progress_bar(range(diff.num_timesteps - 1, -1, -1), progress, f"{sampler} sampling"):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = diff.p_mean_variance(diff.call_model(fn, x, t, model_kwargs), x, t, clip_denoised=clip)
            if sampler == "ddpm":
                x = out["mean"]
                if i > 0:
                    x = x + torch.exp(0.5 * out["log_variance"]) * randn(x.shape, generator, x.device)
            else:
                x = diff.ddim_step(out["pred_xstart"], x, t, eta, generator)
            if callback is not None:
                callback(i, x, out["pred_xstart"])
        return x

    def ddim_step(
        self, pred_x0: Tensor, x_t: Tensor, t: Tensor, eta: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """DDIM update (Song et al. 2021, Eq. 12) from the predicted x0."""
        n = x_t.ndim
        eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        a = self._take("alphas_cumprod", t, n)
        a_prev = self._take("alphas_cumprod_prev", t, n)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        x = pred_x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0 and bool((t > 0).any()):
            nonzero = per_sample((t != 0).float(), n)
            x = x + nonzero * sigma * randn(x_t.shape, generator, x_t.device)
        return x
