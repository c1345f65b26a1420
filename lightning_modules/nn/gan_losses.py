"""GAN objectives for autoencoder training (spec magvit.md §1.7): non-saturating losses, R1, LeCam with EMA anchors,
and the VQGAN adaptive generator weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating D loss: mean softplus(−D(x)) + mean softplus(D(x̂)) (§1.7)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating G loss: mean softplus(−D(x̂)) (§1.7; weighted 0.1 by the caller)."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: Tensor, real_inputs: Tensor) -> Tensor:
    """R1 = mean_b Σ (∂D/∂x)², no ½ factor (§1.7).  ``real_inputs`` must require grad; the graph is kept for backward."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


class LeCamEMA(nn.Module):
    """LeCam regulariser relu(mean D(x) − α_fake)² + relu(α_real − mean D(x̂))² with EMA anchors α (§1.7).

    The anchors start at 0, are buffers (so they are checkpointed), and move after each D step with ``decay``."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return (F.relu(real_logits.float().mean() - self.ema_fake).pow(2)
                + F.relu(self.ema_real - fake_logits.float().mean()).pow(2))

    @torch.no_grad()
    def update(self, real_logits: Tensor, fake_logits: Tensor):
        self.ema_real.lerp_(real_logits.float().mean(), 1 - self.decay)
        self.ema_fake.lerp_(fake_logits.float().mean(), 1 - self.decay)


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN adaptive weight ‖∇_w L_rec‖ / (‖∇_w L_G‖ + 1e-4) at the decoder's last layer, clamped, detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
