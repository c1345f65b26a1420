"""3D StyleGAN discriminator (spec magvit.md §1.6) with optional 3D blur pooling (MAGVIT-v2, §5.2).

``dims=2`` is the per-frame image discriminator of the same layout (frames folded into the batch, kernels
``[co, ci, 1, kh, kw]``, spatial-only pooling) that 2D→3D inflation starts from (§1.11).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .conv3d import Conv3d, avg_pool_same


def _xavier(m: nn.Module):
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


class BlurPool3d(nn.Module):
    """Blur pooling: [1,2,1]^⊗3 (normalised) with stride 2, padding excluded from the weights (§5.2)."""

    def __init__(self, pool_time: bool = True):
        super().__init__()
        k1 = torch.tensor([1.0, 2.0, 1.0])
        kt = k1 if pool_time else torch.ones(1)
        k = kt[:, None, None] * k1[None, :, None] * k1[None, None, :]
        self.register_buffer("kernel", (k / k.sum())[None, None], persistent=False)
        self.stride = (2 if pool_time else 1, 2, 2)
        self.padding = (1 if pool_time else 0, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        k = self.kernel.to(x.dtype)
        y = F.conv3d(x, k.expand(c, 1, *k.shape[2:]), stride=self.stride, padding=self.padding, groups=c)
        mass = F.conv3d(torch.ones_like(x[:1, :1]), k, stride=self.stride, padding=self.padding)
        return y / mass


class AvgPool(nn.Module):
    """2×2×2 average pooling (T pooled too), TF "SAME" excluding padding: a length-1 axis stays 1 (Part 7 item 8)."""

    def __init__(self, pool_time: bool = True):
        super().__init__()
        self.stride = (2 if pool_time else 1, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool_same(x, self.stride)


class DiscriminatorBlock(nn.Module):
    """ResBlock-down: main Conv3→lrelu→pool→Conv3→lrelu, skip pool→1×1×1 conv, output (skip+main)/√2 (§1.6)."""

    def __init__(self, cin: int, cout: int, kt: int, blur: bool):
        super().__init__()
        k = (kt, 3, 3)
        self.conv1 = _xavier(Conv3d(cin, cin, k, pad_mode="zeros"))
        self.conv2 = _xavier(Conv3d(cin, cout, k, pad_mode="zeros"))
        self.skip = _xavier(Conv3d(cin, cout, 1, bias=False, pad_mode="zeros"))
        self.pool = BlurPool3d(kt > 1) if blur else AvgPool(kt > 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(self.pool(h)), 0.2)
        return (self.skip(self.pool(x)) + h) / math.sqrt(2)


class StyleGANDiscriminator(nn.Module):
    """Conv3→lrelu → ResBlock-down per multiplier → Conv3→lrelu → flatten → Dense→lrelu → Dense(1) (§1.6)."""

    def __init__(self, in_channels: int = 3, filters: int = 64, channel_multipliers: tuple[int, ...] = (2, 4, 4, 4, 4),
                 num_frames: int = 16, resolution: int = 128, dims: int = 3, blur: bool = False):
        super().__init__()
        self.dims = dims
        kt = 3 if dims == 3 else 1
        self.conv_in = _xavier(Conv3d(in_channels, filters, (kt, 3, 3), pad_mode="zeros"))
        blocks, cin, t, s = [], filters, num_frames if dims == 3 else 1, resolution
        for m in channel_multipliers:
            blocks.append(DiscriminatorBlock(cin, filters * m, kt, blur))
            cin, t, s = filters * m, -(-t // 2), -(-s // 2)
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = _xavier(Conv3d(cin, cin, (kt, 3, 3), pad_mode="zeros"))
        self.feature_shape = (cin, t, s, s)
        self.fc1 = _xavier(nn.Linear(cin * t * s * s, cin))
        self.fc2 = _xavier(nn.Linear(cin, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Videos [B, C, T, H, W] → logits [B] (3D) or [B·T] (per-frame 2D)."""
        if self.dims == 2:
            x = rearrange(x, "b c t h w -> (b t) c 1 h w")
        h = F.leaky_relu(self.conv_in(x), 0.2)
        h = F.leaky_relu(self.conv_out(self.blocks(h)), 0.2)
        if tuple(h.shape[1:]) != self.feature_shape:
            raise ValueError(f"discriminator built for features {self.feature_shape} got {tuple(h.shape[1:])}: the "
                             "clip size differs from the num_frames/resolution the tokenizer was configured with")
        h = F.leaky_relu(self.fc1(h.flatten(1)), 0.2)
        return self.fc2(h).squeeze(-1)
