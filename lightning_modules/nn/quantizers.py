"""Bottlenecks for autoencoders on ``[B, D, T, H, W]`` latents: VQ (spec magvit.md §1.5), LFQ (§5.1),
diagonal Gaussian (KL) and identity (plain AE); residual VQ (SoundStream, spec make_a_video_videopoet.md §2.2) on
``[B, D, F]`` sequences, built from the same VQ.  Shared by the tokenizers and the models that read their tokens.

Every bottleneck returns a :class:`QuantizerOutput`: the latents the decoder sees (straight-through for VQ/LFQ), the
weighted loss, the unweighted terms for logging and, for discrete bottlenecks, token indices ``[B, T, H, W]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchmetrics import Metric


@dataclass
class QuantizerOutput:
    latents: Tensor                                   # what the decoder sees, [B, D, T, H, W]
    loss: Tensor                                      # weighted sum of the bottleneck's terms
    terms: dict[str, Tensor] = field(default_factory=dict)   # unweighted, for logging
    indices: Tensor | None = None                     # int64 [B, T, H, W] for discrete bottlenecks


def entropy_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(H_sample, H_avg) of softmax(logits) over the last axis, rows = positions (§1.5 entropy loss).

    H_sample = mean_rows(−Σ p log p);  H_avg = −Σ p̄ log(p̄ + 1e-5) with p̄ the row mean of p."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    h_sample = -(p * logp).sum(-1).mean()
    p_avg = p.mean(0)
    h_avg = -(p_avg * torch.log(p_avg + 1e-5)).sum()
    return h_sample, h_avg


def annealed_weight(weight: float, ratio: float, steps: int, step: int | None) -> float:
    """Entropy weight with the optional annealing bonus weight·ratio·max(0, 1 − step/steps) (§1.5, §5.1)."""
    if not ratio or not steps or step is None:
        return weight
    return weight * (1.0 + ratio * max(0.0, 1.0 - step / steps))


class VectorQuantizer(nn.Module):
    """Nearest-code VQ with straight-through gradients, commitment, codebook and entropy losses (§1.5)."""

    def __init__(self, codebook_size: int = 1024, dim: int = 256, commitment_weight: float = 0.25,
                 codebook_weight: float = 1.0, entropy_weight: float = 0.1, entropy_temperature: float = 0.01,
                 entropy_anneal_ratio: float = 0.0, entropy_anneal_steps: int = 0):
        super().__init__()
        bound = math.sqrt(3.0 / codebook_size)  # variance_scaling(1, fan_in, uniform) with fan_in = codebook size
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-bound, bound))
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
        self.anneal = (entropy_anneal_ratio, entropy_anneal_steps)

    def distances(self, flat: Tensor) -> Tensor:
        """Squared L2 distances [N, K] between rows and codes."""
        cb = self.codebook.float()
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]

    def forward(self, z: Tensor, step: int | None = None) -> QuantizerOutput:
        b, _, t, h, w = z.shape
        flat = rearrange(z, "b d t h w -> (b t h w) d").float()
        dist = self.distances(flat)
        idx = dist.argmin(1)
        q = rearrange(self.codebook[idx], "(b t h w) d -> b d t h w", b=b, t=t, h=h, w=w).to(z.dtype)
        commit = F.mse_loss(z, q.detach())
        codebook = F.mse_loss(q, z.detach())
        terms = {"commitment": commit, "codebook": codebook}
        loss = self.commitment_weight * commit + self.codebook_weight * codebook
        ew = annealed_weight(self.entropy_weight, *self.anneal, step)
        if ew:
            h_sample, h_avg = entropy_terms(-dist / self.entropy_temperature)
            terms["entropy"] = h_sample - h_avg
            loss = loss + ew * terms["entropy"]
        st = z + (q - z).detach()
        return QuantizerOutput(st, loss, terms, rearrange(idx, "(b t h w) -> b t h w", b=b, t=t, h=h))

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        b, _, t, h, _ = z.shape
        idx = self.distances(rearrange(z, "b d t h w -> (b t h w) d").float()).argmin(1)
        return rearrange(idx, "(b t h w) -> b t h w", b=b, t=t, h=h)

    def indices_to_latents(self, idx: Tensor) -> Tensor:
        return rearrange(self.codebook[idx], "b t h w d -> b d t h w")


class ResidualVectorQuantizer(nn.Module):
    """SoundStream residual VQ (§2.2: 4 levels × 1024 codes): level ``l`` quantises what the levels before it left,
    ``r_l = r_{l−1} − q_l(r_{l−1})``, ``r_0 = z``; the decoder sees ``Σ_l q_l`` (straight-through). Each level is a
    :class:`VectorQuantizer` (commitment and codebook losses per level, summed). Codebooks start from the first
    training batch's residuals (SoundStream initialises them from data, there by k-means; here by a random draw of
    residual vectors), so no level starts with dead codes."""

    def __init__(self, levels: int = 4, codebook_size: int = 1024, dim: int = 64, commitment_weight: float = 0.25,
                 codebook_weight: float = 1.0):
        super().__init__()
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.vq = nn.ModuleList(VectorQuantizer(codebook_size, dim, commitment_weight, codebook_weight,
                                                entropy_weight=0.0) for _ in range(levels))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from_data(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Set each level's codebook to vectors of that level's residuals of ``z`` [B, D, F] drawn at random (with
        replacement when there are fewer vectors than codes). The residual handed to the next level quantises each
        vector with the codes drawn from *other* vectors (leave-one-out), as unseen data would be; otherwise every
        drawn vector would be its own code and the deeper levels would start from zeros."""
        r = rearrange(z, "b d f -> (b f) d").float()
        n, k = r.shape[0], self.codebook_size
        for vq in self.vq:
            pick = (torch.randint(0, n, (k,), generator=generator) if n < k else
                    torch.randperm(n, generator=generator)[:k]).to(r.device)
            vq.codebook.data.copy_(r[pick])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(vq.codebook.data, 0)  # every rank starts from rank 0's draw
                pick = torch.full_like(pick, -1)  # other ranks' draws: no vector here is its own code
            dist = vq.distances(r)
            own = pick[None, :] == torch.arange(n, device=r.device)[:, None]
            dist = dist.masked_fill(own, float("inf"))
            r = r - vq.codebook[dist.argmin(1)].float()
        self.initialized.fill_(True)

    def forward(self, z: Tensor, step: int | None = None, levels: int | None = None) -> QuantizerOutput:
        """``z`` [B, D, F] → the summed quantisation, loss, per-level terms, indices int64 [B, levels, F]."""
        if self.training and not bool(self.initialized):
            self.init_from_data(z.detach())
        residual, total, loss, idx, terms = z, torch.zeros_like(z), z.new_zeros(()).float(), [], {}
        for lv, vq in enumerate(self.vq[: levels or self.levels]):
            out = vq(rearrange(residual, "b d f -> b d f 1 1"))
            q = rearrange(out.latents, "b d f 1 1 -> b d f")
            total = total + q
            residual = residual - q.detach()
            loss = loss + out.loss
            idx.append(rearrange(out.indices, "b f 1 1 -> b f"))
            for k, v in out.terms.items():
                terms[f"{k}_{lv}"] = v
            terms[f"residual_{lv}"] = residual.detach().float().pow(2).mean()
        return QuantizerOutput(total, loss, terms, torch.stack(idx, 1))

    @torch.no_grad()
    def residual_norms(self, z: Tensor) -> list[float]:
        """RMS of ``z`` and of the residual after each level (the quantisation error shrinks level by level)."""
        r, out = z.float(), [float(z.float().pow(2).mean().sqrt())]
        for vq in self.vq:
            r = r - self._lookup(vq, self._nearest(vq, r))
            out.append(float(r.pow(2).mean().sqrt()))
        return out

    @staticmethod
    def _nearest(vq: VectorQuantizer, r: Tensor) -> Tensor:
        return rearrange(vq.distances(rearrange(r, "b d f -> (b f) d").float()).argmin(1), "(b f) -> b f",
                         b=r.shape[0])

    @staticmethod
    def _lookup(vq: VectorQuantizer, idx: Tensor) -> Tensor:
        return rearrange(vq.codebook[idx], "b f d -> b d f")

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """``z`` [B, D, F] → codes int64 [B, levels, F]."""
        r, idx = z.float(), []
        for vq in self.vq:
            i = self._nearest(vq, r)
            r = r - self._lookup(vq, i).float()
            idx.append(i)
        return torch.stack(idx, 1)

    def indices_to_latents(self, idx: Tensor) -> Tensor:
        """Codes [B, L, F] (L ≤ levels: coarser reconstructions from fewer levels) → Σ_l codebook_l[idx_l] [B, D, F]."""
        return sum(self._lookup(vq, idx[:, lv]) for lv, vq in enumerate(self.vq[: idx.shape[1]]))


class LookupFreeQuantizer(nn.Module):
    """LFQ: q = sign(z) ∈ {−1,+1}^K, index Σ 2^(k) 1[z_k>0] (first channel = LSB), no table (§5.1).

    Entropy penalty E[H(f(z))] − H(E[f(z)]) with f = softmax(−‖z−c‖²/τ) over the 2^K codes.  The logits are
    separable over bits, so per position the code distribution is a product of per-bit Bernoullis; the bits are taken
    in groups of ``entropy_group_bits`` (2^g codes each): H_sample is exact for any grouping, H_avg is the sum of the
    groups' average-distribution entropies (exact when one group holds all bits; the author's "sub-groups" estimate
    for large K)."""

    def __init__(self, bits: int = 18, commitment_weight: float = 0.25, entropy_weight: float = 0.1,
                 entropy_temperature: float = 0.01, entropy_group_bits: int | None = 9,
                 entropy_anneal_ratio: float = 0.0, entropy_anneal_steps: int = 0):
        super().__init__()
        self.bits = self.dim = bits
        self.codebook_size = 2 ** bits
        g = min(entropy_group_bits or bits, bits)
        self.groups = [(s, min(s + g, bits)) for s in range(0, bits, g)]
        self.commitment_weight, self.entropy_weight = commitment_weight, entropy_weight
        self.entropy_temperature = entropy_temperature
        self.anneal = (entropy_anneal_ratio, entropy_anneal_steps)
        self.register_buffer("powers", 2 ** torch.arange(bits, dtype=torch.int64), persistent=False)
        for n in sorted({e - s for s, e in self.groups}):  # ±1 codes of each group width
            codes = ((torch.arange(2 ** n)[:, None] >> torch.arange(n)) & 1).float() * 2 - 1
            self.register_buffer(f"codes{n}", codes, persistent=False)

    def entropy(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(H_sample, H_avg) over rows of z [N, K], grouped as described in the class docstring."""
        h_s, h_a = z.new_zeros(()).float(), z.new_zeros(()).float()
        for s, e in self.groups:
            codes = getattr(self, f"codes{e - s}")
            # −‖z−c‖²/τ = (2⟨z,c⟩ − ‖z‖² − K)/τ; the row constant drops out of the softmax
            logits = 2 * z[:, s:e].float() @ codes.t() / self.entropy_temperature
            a, b = entropy_terms(logits)
            h_s, h_a = h_s + a, h_a + b
        return h_s, h_a

    def forward(self, z: Tensor, step: int | None = None) -> QuantizerOutput:
        q = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
        commit = F.mse_loss(z, q.detach())
        terms = {"commitment": commit}
        loss = self.commitment_weight * commit
        ew = annealed_weight(self.entropy_weight, *self.anneal, step)
        if ew:
            h_sample, h_avg = self.entropy(rearrange(z, "b d t h w -> (b t h w) d"))
            terms["entropy"] = h_sample - h_avg
            loss = loss + ew * terms["entropy"]
        st = z + (q - z).detach()
        return QuantizerOutput(st, loss, terms, self.bits_to_indices(z > 0))

    def bits_to_indices(self, positive: Tensor) -> Tensor:
        """[B, K, T, H, W] booleans → int64 [B, T, H, W], Σ_k 2^k·1[bit k]."""
        return (positive.long() * self.powers.view(1, -1, 1, 1, 1)).sum(1)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        return self.bits_to_indices(z > 0)

    def indices_to_latents(self, idx: Tensor) -> Tensor:
        bits = (idx[:, None] >> torch.arange(self.bits, device=idx.device).view(1, -1, 1, 1, 1)) & 1
        return bits.float() * 2 - 1


class DiagonalGaussian(nn.Module):
    """KL bottleneck: the encoder emits (mean, log-variance); z = mean + σ·ε; KL to N(0, I) per latent element."""

    def __init__(self, dim: int = 4, kl_weight: float = 1e-6):
        super().__init__()
        self.dim, self.kl_weight = dim, kl_weight
        self.codebook_size = None

    @staticmethod
    def split(moments: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, moments: Tensor, step: int | None = None, sample: bool = True,
                generator: torch.Generator | None = None) -> QuantizerOutput:
        mean, logvar = self.split(moments)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + (0.5 * logvar).exp() * eps
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()
        return QuantizerOutput(z, self.kl_weight * kl, {"kl": kl}, None)


class IdentityBottleneck(nn.Module):
    """No bottleneck (plain autoencoder)."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.dim, self.codebook_size = dim, None

    def forward(self, z: Tensor, step: int | None = None, **_) -> QuantizerOutput:
        return QuantizerOutput(z, z.new_zeros(()), {}, None)


# ------------------------------------------------------------------------------------------------------------ metrics
class CodebookUsage(Metric):
    """Fraction of codes used and perplexity exp(H(code histogram)) over everything seen since the last reset."""

    full_state_update = False

    def __init__(self, codebook_size: int, **kw):
        super().__init__(**kw)
        self.codebook_size = codebook_size
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: Tensor):
        self.counts += torch.bincount(indices.flatten(), minlength=self.codebook_size).to(self.counts)

    def compute(self) -> dict[str, Tensor]:
        p = self.counts / self.counts.sum().clamp_min(1)
        h = -(p * torch.log(p.clamp_min(1e-30))).sum()
        return {"usage": (self.counts > 0).double().mean(), "perplexity": h.exp()}


class BitBalance(Metric):
    """LFQ bit balance 1 − 2·mean_k |P(bit k = 1) − ½| (1: every bit fair; 0: every bit constant)."""

    full_state_update = False

    def __init__(self, bits: int, **kw):
        super().__init__(**kw)
        self.bits = bits
        self.add_state("ones", torch.zeros(bits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: Tensor):
        bits = (indices.flatten()[:, None] >> torch.arange(self.bits, device=indices.device)) & 1
        self.ones += bits.sum(0).to(self.ones)
        self.total += bits.shape[0]

    def compute(self) -> Tensor:
        p = self.ones / self.total.clamp_min(1)
        return 1 - 2 * (p - 0.5).abs().mean()


BOTTLENECKS = ("vq", "lfq", "kl", "none")
