"""Per-frame perceptual loss (spec magvit.md §1.8): L2 between an ImageNet classifier's logits on real and
reconstructed frames, frames folded into the batch and bilinearly resized.

The classifier is a torchvision architecture whose weights come from a LOCAL state-dict file (no downloads).  With no
path the loss is off and says so once.  The network is frozen and kept out of ``state_dict()``, ``parameters()``
(so optimisers, EMA and checkpoints never see it); it still follows ``.to()``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ARCHS = ("resnet50", "resnet18", "vgg16")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def build_classifier(arch: str, weights_path: str) -> nn.Module:
    """A torchvision ImageNet classifier with weights from a local file (a state dict, or a dict holding one)."""
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"loss.perceptual_arch must be one of {ARCHS}, got {arch!r}")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"loss.perceptual_weights={weights_path!r} is not a file; give a local torchvision "
                                f"{arch} state dict (.pt/.pth) or set it to null to train without perceptual loss")
    net = getattr(torchvision.models, arch)(weights=None)
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    net.load_state_dict(sd)
    return net.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """mean((f(x) − f(x̂))²) over per-frame classifier logits; inputs in [0, 1], ``[B, C, T, H, W]`` (§1.8)."""

    def __init__(self, weights_path: str | None = None, arch: str = "resnet50", resize: int = 224):
        super().__init__()
        self.resize = resize
        self._net: list[nn.Module] = []  # held outside _modules on purpose (see module docstring)
        if weights_path:
            self._net.append(build_classifier(arch, weights_path))
        else:
            warnings.warn("perceptual loss is OFF: loss.perceptual_weights is not set (give a local torchvision "
                          f"{arch} state-dict file to turn it on)", stacklevel=2)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def enabled(self) -> bool:
        return bool(self._net)

    def _apply(self, fn, recurse=True):
        if self._net:
            self._net[0]._apply(fn)
        return super()._apply(fn, recurse)

    def features(self, x: Tensor) -> Tensor:
        x = rearrange(x, "b c t h w -> (b t) c h w")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize and x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self._net[0](x)

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        if not self._net:
            return fake.new_zeros(())
        with torch.no_grad():
            target = self.features(real)
        return F.mse_loss(self.features(fake).float(), target.float())
