"""Convolutional video autoencoders: MAGVIT 3D CNN (spec magvit.md §1.2–1.4), MAGVIT-v2 causal 3D CNN (§5.2) and
the per-frame 2D image model of the same layout that inflation starts from (§1.11).

All modules work on ``[B, C, T, H, W]``.  A 2D model is the same network with temporal kernel 1 and no temporal
resampling, so a 2D checkpoint's kernels are ``[co, ci, 1, kh, kw]`` and inflate slice-wise (``nn/inflation.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PADDING_MODES = ("reflect", "zeros", "replicate")
DOWNSAMPLE_PADDINGS = ("same", "symmetric")
ADAPTIVE_NORMS = ("resized", "stats")
DEPTH_TO_SPACE_LAYOUTS = ("pt c ph pw", "pt ph pw c")
CAUSAL_UPSAMPLE_KEEP = ("last", "first")


class ConfigError(ValueError):
    """A model setting that cannot work; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------------------- init
def lecun_normal_(w: Tensor) -> Tensor:
    """Flax default kernel init: truncated normal (±2σ), variance 1/fan_in (§1.4 Init)."""
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for one axis."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


# --------------------------------------------------------------------------------------------------------- conv
class Conv3d(nn.Conv3d):
    """3D convolution with TF-"SAME" reflect/zero/replicate padding (§1.4); ``causal`` pads k_t−1 frames in front (§5.2).

    Causal temporal padding replicates the first frame when the mode is reflect/replicate (reflecting would read
    future frames) and is zero for ``zeros``.  ``symmetric`` pads k//2 on both sides of H and W whatever the stride
    (SEED-Voken ``ConvBlock3D``); it differs from "SAME" only for strided convs ((1, 1) instead of (0, 1))."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, bias: bool = True, pad_mode: str = "reflect",
                 causal: bool = False, symmetric: bool = False):
        ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        st = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        super().__init__(cin, cout, ks, st, padding=0, bias=bias)
        if pad_mode not in PADDING_MODES:
            raise ConfigError(f"padding must be one of {PADDING_MODES}, got {pad_mode!r}")
        self.pad_mode = pad_mode
        self.causal = causal
        self.symmetric = symmetric
        lecun_normal_(self.weight)
        if bias:
            nn.init.zeros_(self.bias)

    @staticmethod
    def _pad(x: Tensor, pads: list[int], mode: str) -> Tensor:
        if not any(pads):
            return x
        if mode == "zeros":
            return F.pad(x, pads)
        if mode == "reflect":  # an axis too short to reflect (e.g. a single frame) is replicated instead
            short = [max(pads[i:i + 2]) >= x.shape[-1 - i // 2] for i in range(0, len(pads), 2)]
            if any(short):
                rep = [p if short[i // 2] else 0 for i, p in enumerate(pads)]
                x = F.pad(x, rep, mode="replicate")
                pads = [0 if short[i // 2] else p for i, p in enumerate(pads)]
                if not any(pads):
                    return x
        return F.pad(x, pads, mode=mode)

    def forward(self, x: Tensor) -> Tensor:
        (kt, kh, kw), (st, sh, sw) = self.kernel_size, self.stride
        T, H, W = x.shape[-3:]
        if self.symmetric:
            ph, pw = (kh // 2, kh // 2), (kw // 2, kw // 2)
        else:
            ph, pw = _same_pads(H, kh, sh), _same_pads(W, kw, sw)
        pt = (kt - 1, 0) if self.causal else _same_pads(T, kt, st)
        tmode = ("zeros" if self.pad_mode == "zeros" else "replicate") if self.causal else self.pad_mode
        if tmode == self.pad_mode:
            x = self._pad(x, [*pw, *ph, *pt], self.pad_mode)
        else:
            x = self._pad(self._pad(x, [0, 0, 0, 0, *pt], tmode), [*pw, *ph, 0, 0], self.pad_mode)
        return F.conv3d(x, self.weight, self.bias, self.stride)


# --------------------------------------------------------------------------------------------------------- norms
def _check_groups(channels: int, groups: int):
    if channels % groups:
        raise ConfigError(f"arch.norm_groups={groups} does not divide {channels} channels; pick a divisor of "
                          f"filters × every channel multiplier (e.g. norm_groups: 8)")


class GroupNorm(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-6, §1.4) over (C/G, T, H, W) jointly, or per frame over (C/G, H, W) (§5.2)."""

    def __init__(self, channels: int, groups: int = 32, per_frame: bool = False, affine: bool = True):
        _check_groups(channels, groups)
        super().__init__(groups, channels, eps=1e-6, affine=affine)
        self.per_frame = per_frame

    def forward(self, x: Tensor) -> Tensor:
        if not self.per_frame:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        b = x.shape[0]
        y = F.group_norm(rearrange(x, "b c t h w -> (b t) c h w"), self.num_groups, self.weight, self.bias, self.eps)
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)


def resize_latent(q: Tensor, size: tuple[int, int, int], causal: bool) -> Tensor:
    """Nearest resize of a latent to a feature grid; causal time maps frame i to latent ⌈i/r⌉ (frame 0 → latent 0)."""
    T, H, W = size
    tq = q.shape[2]
    if tq != T:
        if causal and tq > 1:
            r = (T - 1) // (tq - 1)
            idx = (torch.arange(T, device=q.device) + r - 1) // r
        else:
            idx = torch.arange(T, device=q.device) * tq // T
        q = q.index_select(2, idx)
    if q.shape[-2:] != (H, W):
        q = F.interpolate(q, size=(T, H, W), mode="nearest")
    return q


class AdaptiveGroupNorm(nn.Module):
    """Adaptive GroupNorm conditioned on the quantised latent q (§5.2), in one of two forms (``conditioning``):

    * ``resized``: GN(x)·(1+γ(q↑)) + β(q↑), γ/β 1×1×1 convs of the nearest-resized latent, per position (O2);
    * ``stats``: GN(x)·γ(σ(q)) + β(μ(q)), γ/β linear in the latent's per-channel std (unbiased variance + eps)
      and mean, no ``1+`` (SEED-Voken ``improved_video_model`` / ``improved_model`` ``AdaptiveGroupNorm``), taken over
      the GroupNorm's extent: all of (T, H, W), or (H, W) of each frame for a per-frame norm (latent frames mapped
      to feature frames as in ``resize_latent``).

    Both start as a plain normalisation (γ ≡ 1, β ≡ 0)."""

    def __init__(self, channels: int, latent_channels: int, groups: int, per_frame: bool, causal: bool,
                 conditioning: str = "resized"):
        super().__init__()
        self.norm = GroupNorm(channels, groups, per_frame, affine=False)
        self.conditioning = conditioning
        layer = (lambda: nn.Conv3d(latent_channels, channels, 1)) if conditioning == "resized" else \
            (lambda: nn.Linear(latent_channels, channels))
        self.gamma, self.beta = layer(), layer()
        for m in (self.gamma, self.beta):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if conditioning == "stats":
            nn.init.ones_(self.gamma.bias)
        self.causal = causal

    def forward(self, x: Tensor, q: Tensor) -> Tensor:
        if self.conditioning == "stats":
            if self.norm.per_frame:
                q = resize_latent(q, (x.shape[2], *q.shape[-2:]), self.causal)
                flat = rearrange(q, "b c t h w -> b t c (h w)")
            else:
                flat = rearrange(q, "b c t h w -> b 1 c (t h w)")
            std = (flat.var(dim=-1) + self.norm.eps).sqrt()
            scale = rearrange(self.gamma(std), "b t c -> b c t 1 1")
            shift = rearrange(self.beta(flat.mean(dim=-1)), "b t c -> b c t 1 1")
            return self.norm(x) * scale + shift
        q = resize_latent(q, tuple(x.shape[-3:]), self.causal)
        return self.norm(x) * (1 + self.gamma(q)) + self.beta(q)


# --------------------------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class _Layout:
    """What every conv/norm of one autoencoder shares, derived from the arch config."""

    kt: int            # temporal kernel: 3 (video) or 1 (per-frame image model)
    causal: bool
    per_frame: bool    # per-frame GroupNorm
    pad_mode: str
    groups: int
    symmetric: bool = False  # k//2 spatial padding on strided convs (SEED-Voken) instead of TF "SAME"

    def conv(self, cin, cout, k=3, stride=1, bias=True) -> Conv3d:
        kernel = (self.kt if k > 1 else 1, k, k)
        return Conv3d(cin, cout, kernel, stride, bias=bias, pad_mode=self.pad_mode, causal=self.causal,
                      symmetric=self.symmetric)

    def norm(self, c) -> GroupNorm:
        return GroupNorm(c, self.groups, self.per_frame)


class ResBlock(nn.Module):
    """GN → swish → Conv3 → GN → swish → Conv3 (no bias) plus 1×1×1 shortcut when channels change (§1.4)."""

    def __init__(self, cin: int, cout: int, lay: _Layout):
        super().__init__()
        self.norm1, self.conv1 = lay.norm(cin), lay.conv(cin, cout, bias=False)
        self.norm2, self.conv2 = lay.norm(cout), lay.conv(cout, cout, bias=False)
        self.shortcut = lay.conv(cin, cout, k=1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


def avg_pool_same(x: Tensor, stride: tuple[int, int, int]) -> Tensor:
    """Average pooling, window = stride, TF "SAME" with padding excluded from the mean (§1.2, Part 7 item 8).

    For window 2 an odd axis needs one padded element after the end; replicating the last element gives exactly the
    padding-excluded mean, and a length-1 axis stays length 1."""
    pads = []
    for n, s in zip(reversed(x.shape[-3:]), reversed(stride)):
        pads += [0, (-n) % s]
    if any(pads):
        if any(s > 2 for s in stride):
            raise ValueError("avg_pool_same supports strides of 1 or 2")
        x = F.pad(x, pads, mode="replicate")
    return F.avg_pool3d(x, stride, stride)


class Downsample(nn.Module):
    """Encoder downsampling: average pooling (MAGVIT §1.2) or a strided conv (4³ for MAGVIT, causal 3³ for v2 §5.2)."""

    def __init__(self, channels: int, stride: tuple[int, int, int], conv: bool, lay: _Layout):
        super().__init__()
        self.stride = stride
        k = 3 if lay.causal else 4
        self.conv = lay.conv(channels, channels, k=k, stride=stride) if conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else avg_pool_same(x, self.stride)


class Upsample(nn.Module):
    """Decoder upsampling: nearest resize then Conv3 (MAGVIT §1.3), or Conv3 then depth-to-space (v2 §5.2).

    Depth-to-space reads the conv's channels as ``layout``: ``pt c ph pw`` keeps the time factor outermost (so
    inflation tiles a 2D kernel over pt), ``pt ph pw c`` is SEED-Voken's ``depth_to_space3d`` (DCR order).  Of the
    first latent frame's pt output frames only one is kept, so that 1+n latent frames give 1+pt·n frames: the last
    (``keep="last"``, O2 drops the first pt−1) or the first (``keep="first"``, SEED-Voken drops frames 1..pt−1)."""

    def __init__(self, channels: int, t: int, depth_to_space: bool, lay: _Layout, layout: str = "pt c ph pw",
                 keep: str = "last"):
        super().__init__()
        self.t, self.d2s = t, depth_to_space
        self.pattern = f"b ({layout}) t h w -> b c (t pt) (h ph) (w pw)"
        self.keep = keep
        self.conv = lay.conv(channels, channels * t * 4 if depth_to_space else channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.d2s:
            x = rearrange(self.conv(x), self.pattern, pt=self.t, ph=2, pw=2)
            if self.keep == "first":
                return torch.cat([x[:, :, :1], x[:, :, self.t:]], dim=2)
            return x[:, :, self.t - 1:]
        x = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
        if self.t > 1:
            x = x.repeat_interleave(self.t, dim=-3)
        return self.conv(x)


# --------------------------------------------------------------------------------------------------------- enc/dec
@dataclass
class ArchConfig:
    """Generator layout (§1.2–1.4, §1.12; MAGVIT-v2 §5.2).  Defaults are MAGVIT-B for 16×128²."""

    kind: str = "magvit"            # "magvit": 3D CNN (§1.2) | "magvit2": causal 3D CNN (§5.2)
    dims: int = 3                   # 3: video model; 2: per-frame image model of the same layout (§1.11)
    filters: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (True, True, False)
    padding: str = "reflect"        # reflect (paper) | zeros (released configs) | replicate — Part 7 item 1
    norm_groups: int = 32
    conv_downsample: bool = False   # MAGVIT option (4³ strided conv); always on for magvit2
    in_channels: int = 3
    zero_centered: bool = False     # False: the network sees [0,1] pixels as in the MAGVIT configs (§1.1)
    # Open-MAGVIT2 layout switches (SEED-Voken improved_video_model.py); the defaults are MAGVIT-v2 (§5.2, O2):
    norm_per_frame: bool | None = None  # null: per frame for magvit2 / dims 2 (§5.2); false: GN over all frames (SEED)
    downsample_padding: str = "same"    # same: TF "SAME" (0,1) on strided convs | symmetric: k//2 each side (SEED)
    adaptive_norm: str = "resized"      # resized: (1+γ(q↑))GN+β(q↑) (O2) | stats: γ(std q)GN+β(mean q) (SEED)
    mid_adaptive_norm: bool = True      # AdaGN before the decoder's middle res blocks (O2); SEED: none there
    depth_to_space: str = "pt c ph pw"  # decoder depth-to-space channel layout; "pt ph pw c": SEED depth_to_space3d
    causal_upsample_keep: str = "last"  # first latent frame keeps its last (O2) or first (SEED Upsampler) new frame

    def validate(self):
        if self.kind not in ("magvit", "magvit2"):
            raise ConfigError(f"arch.kind must be 'magvit' or 'magvit2', got {self.kind!r}")
        if self.dims not in (2, 3):
            raise ConfigError(f"arch.dims must be 2 (per-frame image model) or 3 (video model), got {self.dims!r}")
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ConfigError(f"arch.temporal_downsample needs len(channel_multipliers)-1 = "
                              f"{len(self.channel_multipliers) - 1} entries, got {list(self.temporal_downsample)}")
        if self.padding not in PADDING_MODES:
            raise ConfigError(f"arch.padding must be one of {PADDING_MODES}, got {self.padding!r}")
        for key, allowed in (("downsample_padding", DOWNSAMPLE_PADDINGS), ("adaptive_norm", ADAPTIVE_NORMS),
                             ("depth_to_space", DEPTH_TO_SPACE_LAYOUTS),
                             ("causal_upsample_keep", CAUSAL_UPSAMPLE_KEEP)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"arch.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.downsample_padding == "symmetric" and not self.causal:
            raise ConfigError("arch.downsample_padding: symmetric needs the 3×3×3 strided convs of kind: magvit2 "
                              f"(kind {self.kind!r} downsamples with 4³ convs or pooling); set it to 'same'")
        for m in self.channel_multipliers:
            _check_groups(self.filters * m, self.norm_groups)

    @property
    def causal(self) -> bool:
        return self.kind == "magvit2"

    @property
    def layout(self) -> _Layout:
        per_frame = (self.causal or self.dims == 2) if self.norm_per_frame is None else self.norm_per_frame
        return _Layout(kt=3 if self.dims == 3 else 1, causal=self.causal, per_frame=per_frame,
                       pad_mode=self.padding, groups=self.norm_groups,
                       symmetric=self.downsample_padding == "symmetric")

    @property
    def time_strides(self) -> tuple[int, ...]:
        return tuple(2 if (td and self.dims == 3) else 1 for td in self.temporal_downsample)

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.time_strides)

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.temporal_downsample)


class Encoder(nn.Module):
    """Conv → [res blocks, downsample] per stage → res blocks → GN → swish → 1×1×1 conv (§1.2; v2 §5.2)."""

    def __init__(self, cfg: ArchConfig, out_channels: int):
        super().__init__()
        lay, f, m = cfg.layout, cfg.filters, cfg.channel_multipliers
        self.conv_in = lay.conv(cfg.in_channels, f, bias=False)
        blocks, cin = [], f
        for i, mult in enumerate(m):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, f * mult, lay))
                cin = f * mult
            if i < len(m) - 1:
                blocks.append(Downsample(cin, (cfg.time_strides[i], 2, 2), cfg.conv_downsample or cfg.causal, lay))
        for _ in range(cfg.num_res_blocks):
            blocks.append(ResBlock(cin, cin, lay))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = lay.norm(cin)
        self.conv_out = lay.conv(cin, out_channels, k=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class DecoderStage(nn.Module):
    """One decoder resolution: [adaptive GN on the latent (v2)] → res blocks → [upsample]."""

    def __init__(self, cin: int, cout: int, n: int, up_t: int | None, cfg: ArchConfig, latent_channels: int,
                 adaptive: bool = True):
        super().__init__()
        lay = cfg.layout
        self.adanorm = (AdaptiveGroupNorm(cin, latent_channels, cfg.norm_groups, lay.per_frame, cfg.causal,
                                          cfg.adaptive_norm) if cfg.causal and adaptive else None)
        self.blocks = nn.Sequential(*[ResBlock(cin if j == 0 else cout, cout, lay) for j in range(n)])
        self.upsample = (Upsample(cout, up_t, cfg.causal, lay, cfg.depth_to_space, cfg.causal_upsample_keep)
                         if up_t is not None else None)

    def forward(self, x: Tensor, q: Tensor) -> Tensor:
        if self.adanorm is not None:
            x = self.adanorm(x, q)
        x = self.blocks(x)
        return self.upsample(x) if self.upsample is not None else x


class Decoder(nn.Module):
    """Conv → res blocks → per stage (deep to shallow) [res blocks, upsample] → GN → swish → Conv → pixels (§1.3)."""

    def __init__(self, cfg: ArchConfig, latent_channels: int, out_channels: int | None = None):
        super().__init__()
        lay, f, m = cfg.layout, cfg.filters, cfg.channel_multipliers
        cin = f * m[-1]
        self.conv_in = lay.conv(latent_channels, cin)
        self.mid = DecoderStage(cin, cin, cfg.num_res_blocks, None, cfg, latent_channels, cfg.mid_adaptive_norm)
        stages = []
        for i in reversed(range(len(m))):
            up_t = cfg.time_strides[i - 1] if i > 0 else None
            stages.append(DecoderStage(cin, f * m[i], cfg.num_res_blocks, up_t, cfg, latent_channels))
            cin = f * m[i]
        self.stages = nn.ModuleList(stages)
        self.norm_out = lay.norm(cin)
        self.conv_out = lay.conv(cin, out_channels or cfg.in_channels)

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, q: Tensor) -> Tensor:
        x = self.mid(self.conv_in(q), q)
        for stage in self.stages:
            x = stage(x, q)
        return self.conv_out(F.silu(self.norm_out(x)))


def causal_param_names(module: nn.Module, prefix: str = "") -> set[str]:
    """Names of the kernels of causal convs (inflated into the last temporal slice, §5.2)."""
    return {f"{prefix}{name}.weight" for name, m in module.named_modules() if isinstance(m, Conv3d) and m.causal}
