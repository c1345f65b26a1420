"""C3D fine-tuned on UCF-101: the network of the video Inception Score (TGAN2, Saito et al. 2020, §5; Tran et al. 2015).

The architecture and preprocessing follow TGAN2's ``C3DVersion1UCF101`` (pfnet-research/tgan2,
``tgan2/models/c3d/c3d_ucf101.py``), which StyleGAN-V's ``c3d_ucf101.pt`` (TorchScript) reproduces:

- input ``[B, 3, 16, H, W]`` RGB in [-1, 1]; a fixed 1x1x1 map to BGR scaled by 128; every frame resized to 112 x 112
  (bilinear, corners aligned, as Chainer's ``resize_images``); plus ``128 - mean``, the Sports-1M/UCF-101 C3D mean
  clip (``mean2.npz``, BGR ``[3, 16, 128, 128]``, centre 112 x 112 crop);
- conv1a 64 - pool (1,2,2) - conv2a 128 - pool 2 - conv3a/b 256 - pool 2 - conv4a/b 512 - pool 2 - conv5a/b 512 -
  pool 2 (ceil: Chainer's ``cover_all``, 7 -> 4) - fc6 4096 - fc7 4096 - fc8 101; 3x3x3 convolutions, padding 1,
  ReLU; dropout only in training;
- the Inception Score reads ``softmax(fc8)``.

Weights load from local files only (:func:`load_c3d`): TGAN2's Chainer ``conv3d_deepnetA_ucf.npz`` plus its
``mean2.npz`` (``numpy.load(allow_pickle=False)``: arrays only), a ``state_dict`` saved by this module (weights-only
``safe_load``), or StyleGAN-V's TorchScript ``c3d_ucf101.pt`` (run as TorchScript, which takes uint8-range frames).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["C3D", "TorchScriptC3D", "load_c3d", "C3D_NUM_FRAMES", "C3D_RESOLUTION", "C3D_LAYERS"]

C3D_NUM_FRAMES = 16
C3D_RESOLUTION = 112
#: (name, in, out) of the 3x3x3 convolutions, and the pooling after each named layer
C3D_LAYERS = [("conv1a", 3, 64), ("conv2a", 64, 128), ("conv3a", 128, 256), ("conv3b", 256, 256),
              ("conv4a", 256, 512), ("conv4b", 512, 512), ("conv5a", 512, 512), ("conv5b", 512, 512)]
_POOL_AFTER = {"conv1a": (1, 2, 2), "conv2a": 2, "conv3b": 2, "conv4b": 2, "conv5b": 2}


class C3D(nn.Module):
    """TGAN2's UCF-101 C3D with its preprocessing built in: [-1, 1] RGB clips -> fc8 logits (101)."""

    feature_dim = 101

    def __init__(self, num_classes: int = 101, mean: Tensor | None = None):
        super().__init__()
        self.convs = nn.ModuleDict({name: nn.Conv3d(cin, cout, 3, padding=1) for name, cin, cout in C3D_LAYERS})
        self.fc6 = nn.Linear(512 * 4 * 4, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.drop = nn.Dropout(0.5)
        # 128 - mean (BGR, 16 x 112 x 112); zeros mean "mean = 128" (no mean file given)
        self.register_buffer("offset", torch.zeros(3, C3D_NUM_FRAMES, C3D_RESOLUTION, C3D_RESOLUTION))
        if mean is not None:
            self.set_mean(mean)

    def set_mean(self, mean: Tensor) -> None:
        """``mean``: the BGR mean clip ``[3, 16, 128, 128]`` (TGAN2 ``mean2.npz``) or already ``[3, 16, 112, 112]``."""
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if mean.ndim == 4 and mean.shape[-1] == 128:
            mean = mean[:, :, 8:8 + C3D_RESOLUTION, 8:8 + C3D_RESOLUTION]
        if tuple(mean.shape) != (3, C3D_NUM_FRAMES, C3D_RESOLUTION, C3D_RESOLUTION):
            raise ValueError(f"C3D mean clip must be [3, 16, 128, 128] (mean2.npz), got {tuple(mean.shape)}")
        self.offset.copy_(128.0 - mean)

    def preprocess(self, video: Tensor) -> Tensor:
        """[-1, 1] RGB ``[B, 3, 16, H, W]`` -> the network's input (BGR x 128, 112^2 corner-aligned bilinear, + 128 - mean)."""
        if video.ndim != 5 or video.shape[1] != 3 or video.shape[2] != C3D_NUM_FRAMES:
            raise ValueError(f"C3D takes RGB clips [B, 3, {C3D_NUM_FRAMES}, H, W] in [-1, 1], got {tuple(video.shape)}")
        x = video.float().flip(1) * 128.0  # RGB -> BGR, scaled (TGAN2's fixed 1x1x1 'pre' convolution)
        b = x.shape[0]
        if x.shape[-2:] != (C3D_RESOLUTION, C3D_RESOLUTION):
            frames = rearrange(x, "b c t h w -> (b t) c h w")
            frames = F.interpolate(frames, size=(C3D_RESOLUTION, C3D_RESOLUTION), mode="bilinear", align_corners=True)
            x = rearrange(frames, "(b t) c h w -> b c t h w", b=b)
        return x + self.offset

    def forward(self, video: Tensor) -> Tensor:
        h = self.preprocess(video)
        for name, conv in self.convs.items():
            h = F.relu(conv(h))
            if name in _POOL_AFTER:
                k = _POOL_AFTER[name]
                h = F.max_pool3d(h, k, k, ceil_mode=name == "conv5b")
        h = self.drop(rearrange(h, "b c t h w -> b (c t h w)"))
        h = self.drop(F.relu(self.fc6(h)))
        h = self.drop(F.relu(self.fc7(h)))
        return self.fc8(h)

    def load_chainer_npz(self, path: str | os.PathLike, mean_path: str | os.PathLike | None = None) -> None:
        """TGAN2's Chainer weights (``conv1a/W``, ``conv1a/b``, ..., ``fc8/b``) and optionally its ``mean2.npz``."""
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        sd = {}
        for name, _, _ in C3D_LAYERS:
            sd[f"convs.{name}.weight"], sd[f"convs.{name}.bias"] = arrays[f"{name}/W"], arrays[f"{name}/b"]
        for name in ("fc6", "fc7", "fc8"):
            sd[f"{name}.weight"], sd[f"{name}.bias"] = arrays[f"{name}/W"], arrays[f"{name}/b"]
        missing = [k for k, v in sd.items() if v is None]
        if missing:
            raise KeyError(f"{path}: missing {missing}")
        own = self.state_dict()
        for k, v in sd.items():
            t = torch.from_numpy(np.ascontiguousarray(v)).float()
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, the C3D expects {tuple(own[k].shape)}")
            own[k] = t
        self.load_state_dict(own)
        if mean_path is not None:
            with np.load(mean_path, allow_pickle=False) as z:
                self.set_mean(torch.from_numpy(z["mean"]))


class TorchScriptC3D(nn.Module):
    """StyleGAN-V's ``c3d_ucf101.pt`` behind the :class:`C3D` call: [-1, 1] clips in, logits out.

    StyleGAN-V feeds it uint8-range ``[B, 3, 16, H, W]`` clips (``x * 127.5 + 128`` clamped) and reads class
    probabilities; those are returned as log-probabilities, so softmax of the output gives them back."""

    feature_dim = 101

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        self.module = module

    def forward(self, video: Tensor) -> Tensor:
        x = (video.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)  # as StyleGAN-V passes them
        probs = self.module(x)
        return probs.float().clamp_min(1e-30).log()


def load_c3d(path: str | os.PathLike, mean_path: str | os.PathLike | None = None,
             map_location: str | torch.device = "cpu") -> nn.Module:
    """The UCF-101 C3D from a local file: Chainer ``.npz`` (+ ``mean_path``), our ``.pt`` state dict, or a TorchScript
    archive (StyleGAN-V). Eval mode, no gradients."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"C3D weights {path!r} not found (weights load from local paths only: TGAN2's "
                                "conv3d_deepnetA_ucf.npz with --c3d-mean mean2.npz, or StyleGAN-V's c3d_ucf101.pt)")
    if path.endswith(".npz"):
        model = C3D()
        model.load_chainer_npz(path, mean_path)
    else:
        import zipfile

        is_script = zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") or "/code/" in n
                                                     for n in zipfile.ZipFile(path).namelist())
        if is_script:
            model = TorchScriptC3D(torch.jit.load(path, map_location=map_location))
        else:
            from .checkpoint import read_state_dict

            model = C3D()
            model.load_state_dict(read_state_dict(path), strict=True)
            if mean_path is not None:
                import numpy as np

                with np.load(mean_path, allow_pickle=False) as z:
                    model.set_mean(torch.from_numpy(z["mean"]))
    return model.to(map_location).eval().requires_grad_(False)
