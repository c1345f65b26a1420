"""Weight initialisation shared by the DiT family (DiT, Latte, PixArt/Latte-1, Open-Sora STDiT3)."""

from __future__ import annotations

from torch import nn


def xavier_linears_(module: nn.Module) -> nn.Module:
    """DiT's ``_basic_init``: every ``nn.Linear`` below ``module`` gets xavier-uniform weights and zero biases."""

    def init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    return module.apply(init)
