"""Per-frame perceptual losses, frames folded into the batch; two kinds (``loss.perceptual_kind``):

* ``logits`` (MAGVIT, arXiv 2212.05199 §3.1): L2 between an ImageNet classifier's logits on real and reconstructed
  frames (bilinearly resized to ``resize``); the classifier is a torchvision ResNet-50 (or resnet18/vgg16).
* ``lpips`` (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", Eq. 1;
  the reconstruction loss of the SD VAE and SEED-Voken): unit-normalised VGG-16 features of 5 layers, squared
  differences weighted by the learned linear heads (1x1 convs), spatially averaged and summed over layers.  The
  heads ship with the ``lpips`` package (``weights/v0.1/vgg.pth``); the VGG-16 backbone is built random by it
  (``pnet_rand``: nothing downloads) and loaded here from a local torchvision VGG-16 state dict.

Weights come from LOCAL files only.  With no path the loss is off and says so once.  The network is frozen and kept
out of ``state_dict()``, ``parameters()`` (so optimisers, EMA and checkpoints never see it); it still follows ``.to()``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checkpoint import read_state_dict

ARCHS = ("resnet50", "resnet18", "vgg16")
KINDS = ("logits", "lpips")
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
    net.load_state_dict(read_state_dict(weights_path, prefer=("state_dict", "model")))
    return net.eval().requires_grad_(False)


def build_lpips(vgg_path: str) -> nn.Module:
    """``lpips.LPIPS`` (VGG, v0.1) with the package's linear heads and the VGG-16 backbone from a local file (a
    torchvision ``vgg16`` state dict, whole or only its ``features.*`` entries)."""
    try:
        import lpips
    except ImportError as e:
        raise ImportError("loss.perceptual_kind='lpips' needs the lpips package (`pip install lpips`)") from e
    if not os.path.isfile(vgg_path):
        raise FileNotFoundError(f"loss.perceptual_weights={vgg_path!r} is not a file; give a local torchvision VGG-16 "
                                "state dict (see the README's table of external inputs) or set it to null")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation note on `pretrained=False`
        net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    sd = read_state_dict(vgg_path, prefer=("state_dict", "model"))
    feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    # lpips.pretrained_networks.vgg16 keeps torchvision's layer index as the module name inside 5 slices
    own = {name.split(".", 1)[1]: name for name in net.net.state_dict()}
    missing = sorted(set(own) - set(feats))
    if missing:
        raise KeyError(f"{vgg_path}: not a torchvision VGG-16 state dict (no features.{missing[0]})")
    net.net.load_state_dict({own[k]: feats[k] for k in own})
    return net.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """Per-frame perceptual loss on ``[B, C, T, H, W]`` in [0, 1]: classifier-logit L2 (``logits``) or LPIPS."""

    def __init__(self, weights_path: str | None = None, arch: str = "resnet50", resize: int = 224,
                 kind: str = "logits"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"loss.perceptual_kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.resize = kind, resize
        self._net: list[nn.Module] = []  # held outside _modules on purpose (see module docstring)
        if weights_path:
            self._net.append(build_lpips(weights_path) if kind == "lpips" else build_classifier(arch, weights_path))
        else:
            what = "VGG-16" if kind == "lpips" else arch
            warnings.warn("perceptual loss is OFF: loss.perceptual_weights is not set (give a local torchvision "
                          f"{what} state-dict file to turn it on)", stacklevel=2)
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
        if self.kind == "lpips":  # Eq. 1 per frame at the frames' own size, averaged over frames
            r = rearrange(real, "b c t h w -> (b t) c h w")
            f = rearrange(fake, "b c t h w -> (b t) c h w")
            if r.shape[1] == 1:
                r, f = r.expand(-1, 3, -1, -1), f.expand(-1, 3, -1, -1)
            return self._net[0](f.float(), r.float(), normalize=True).mean()
        with torch.no_grad():
            target = self.features(real)
        return F.mse_loss(self.features(fake).float(), target.float())
