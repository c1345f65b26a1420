"""The diffusion U-Net written once (ADM, Dhariwal & Nichol 2021; Imagen, Saharia et al. 2022), with Make-A-Video's
pseudo-3D layers (Singer et al. 2022, §3.2; spec make_a_video_videopoet.md §1.3).

Every stage of the Make-A-Video cascade is a configuration of ``UNet``:

* D (image decoder): ``temporal=False``, ``cond_dim`` = CLIP image-embedding width (y_e projected and added to the
  timestep embedding, plus ``num_cond_tokens`` context tokens attended by the attention layers).
* D^t (spatiotemporal decoder): the same with ``temporal=True`` and ``fps_cond=True``; ``load_image_weights`` loads D
  into it with no conversion (temporal layers and the fps embedding are new and identity/zero at init).
* ↑F (masked frame interpolation): D^t with ``cond_in_channels=4`` (masked RGB + mask, zero-initialised input weights)
  and ``skip_cond=True`` (the frame skip embedded like fps, zero-initialised); ``load_pretrained`` loads D^t into it.
* SR_l^t / SR_h: ``cond_in_channels=3`` (the upsampled low-resolution video, concatenated) and ``noise_aug_cond=True``
  (the noise-augmentation level embedded like a timestep).

Layout: ``forward`` takes an image batch ``[B, C, H, W]`` or a video batch ``[B, C, T, H, W]``. Internally every
activation is a batch of frames ``[(B T), C, H, W]``: 2D convolutions, GroupNorm and spatial attention act on each
frame alone (Eq. 2 / Eq. 3: the pretrained 2D layers see frames as images), and the temporal layers regroup to
``[(B H W), C, T]`` (convolution) or ``[(B H W), T, C]`` (attention). With T = 1 (an image batch) the temporal
layers are skipped, so an image batch never touches a temporal parameter.

Names: every temporal parameter has ``temporal`` in its name (``*.temporal.*``, ``*.temporal_attn.*``) and the fps
embedding is ``fps_embed.*``; ``UNet.new_video_parameters()`` lists both (what D^t adds to D).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from vidgen.lightning_modules.nn.attention import CrossAttention, MultiHeadAttention, attention
from vidgen.lightning_modules.nn.checkpoint import KeyReport
from vidgen.lightning_modules.nn.embeddings import TimestepEmbedder

__all__ = [
    "UNetConfig",
    "UNet",
    "PseudoConv3d",
    "FullConv3d",
    "TemporalConv1d",
    "SpatialAttention",
    "TemporalAttention",
    "PseudoAttention3d",
    "RelativePositionBias",
    "ResBlock",
    "Downsample",
    "Upsample",
    "UNET_SIZES",
]

CONV_TYPES = ("pseudo3d", "full3d")
NEW_VIDEO_PATTERNS = ("temporal", "fps_embed")  # parameter-name fragments of what D^t adds to D
NEW_INTERP_PATTERNS = ("skip_embed",)  # what ↑F adds to D^t (besides the widened input convolution)


class UNetConfigError(ValueError):
    """A U-Net setting that cannot work; the message names the field and the fix."""


@dataclass
class UNetConfig:
    """U-Net shape and conditioning (see the module docstring for which stage uses what).

    model_channels, channel_mult, num_res_blocks: width of level 0, multiplier per level, residual blocks per level
        (ADM / Imagen). attention_levels: levels (0 = full resolution) that get (pseudo-3D) attention after each block
        and in the middle. num_head_channels: channels per attention head. groups: GroupNorm groups.
    temporal: add the pseudo-3D temporal layers (D^t, ↑F, SR_l^t). temporal_kernel: the 1D temporal conv size
        [unverified: 3]. conv_type: 'pseudo3d' (Eq. 2) or 'full3d' (a k^3 Conv3d; the ablation the paper avoids).
        max_frames: the span of the temporal relative position bias.
    cond_dim: width of the image embedding y_e (0: no such condition). num_cond_tokens: context tokens made from y_e
        (DALL-E 2 / GLIDE [unverified: 4]). context_dim: width of extra context tokens passed in (e.g. text; 0: none).
    fps_cond: embed fps (sinusoidal -> MLP, zero-initialised last layer) and add it to the timestep embedding.
    noise_aug_cond: embed the noise-augmentation level of the low-resolution input (SR stages), added likewise.
    skip_cond: embed the frame skip of masked frame interpolation (↑F, §1.4), zero-initialised last layer, added
        likewise (so ↑F at init equals D^t).
    cond_in_channels: conditioning channels concatenated to the input (↑F: 4 = masked RGB + mask; SR: 3 = the
        upsampled low-resolution frames); their input-conv weights start at zero.
    learn_sigma: output 2x channels (learned-range variances).
    """

    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2, 3)
    num_head_channels: int = 64
    groups: int = 32
    dropout: float = 0.0
    temporal: bool = False
    temporal_kernel: int = 3
    conv_type: str = "pseudo3d"
    max_frames: int = 64
    cond_dim: int = 0
    num_cond_tokens: int = 4
    context_dim: int = 0
    fps_cond: bool = False
    noise_aug_cond: bool = False
    skip_cond: bool = False
    cond_in_channels: int = 0
    learn_sigma: bool = False

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(a) for a in self.attention_levels)
        self.validate()

    def validate(self) -> None:
        if self.conv_type not in CONV_TYPES:
            raise UNetConfigError(f"unet.conv_type must be one of {CONV_TYPES}, got {self.conv_type!r}")
        if self.conv_type == "full3d" and not self.temporal:
            raise UNetConfigError("unet.conv_type='full3d' is a video network: set temporal: true")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise UNetConfigError(f"unet.channel_mult must be positive integers, got {self.channel_mult}")
        for lvl in self.attention_levels:
            if not 0 <= lvl < len(self.channel_mult):
                raise UNetConfigError(
                    f"unet.attention_levels {self.attention_levels}: level {lvl} does not exist "
                    f"(levels 0..{len(self.channel_mult) - 1} for channel_mult {self.channel_mult})")
        for lvl, m in enumerate(self.channel_mult):
            ch = self.model_channels * m
            if ch % self.groups:
                raise UNetConfigError(f"unet: width {ch} (model_channels x {m}) is not divisible by groups={self.groups}")
            attends = lvl in self.attention_levels or lvl == len(self.channel_mult) - 1  # the middle block attends
            if attends and ch % self.num_head_channels:
                raise UNetConfigError(
                    f"unet: width {ch} is not divisible by num_head_channels={self.num_head_channels}; pick a divisor")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise UNetConfigError(f"unet.temporal_kernel must be odd and >= 1 (identity init), got {self.temporal_kernel}")
        if self.cond_dim < 0 or self.context_dim < 0 or self.cond_in_channels < 0:
            raise UNetConfigError("unet.cond_dim / context_dim / cond_in_channels must be >= 0")
        if self.cond_dim and self.num_cond_tokens < 0:
            raise UNetConfigError(f"unet.num_cond_tokens must be >= 0, got {self.num_cond_tokens}")

    @property
    def emb_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def has_context(self) -> bool:
        return bool(self.context_dim) or bool(self.cond_dim and self.num_cond_tokens)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Pseudo-3D convolution (Eq. 2)
# ----------------------------------------------------------------------------------------------------------------------
class TemporalConv1d(nn.Conv1d):
    """The 1D temporal convolution of Eq. 2, Dirac-initialised with zero bias: the identity at init (§3.2)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.dirac_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, frames: int) -> Tensor:  # type: ignore[override]
        h, w = x.shape[-2:]
        y = rearrange(x, "(b f) c h w -> (b h w) c f", f=frames)
        y = super().forward(y)
        return rearrange(y, "(b h w) c f -> (b f) c h w", h=h, w=w)


class PseudoConv3d(nn.Module):
    """Eq. 2: ``Conv_P3D(h) = Conv_1D(Conv_2D(h) ∘ T) ∘ T``; the 1D part is skipped for images (T = 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 temporal: bool = False, temporal_kernel: int = 3):
        super().__init__()
        self.spatial = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        self.temporal = TemporalConv1d(out_channels, temporal_kernel) if temporal else None

    def forward(self, x: Tensor, frames: int) -> Tensor:
        x = self.spatial(x)
        if self.temporal is not None and frames > 1:
            x = self.temporal(x, frames)
        return x


class FullConv3d(nn.Module):
    """A full ``k x k x k`` 3D convolution over ``[(B T), C, H, W]`` frames (the ablation Eq. 2 factorises away)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 temporal: bool = True, temporal_kernel: int = 3):
        super().__init__()
        kt = temporal_kernel
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kernel_size, kernel_size), stride=(1, stride, stride),
                              padding=(kt // 2, kernel_size // 2, kernel_size // 2))

    def forward(self, x: Tensor, frames: int) -> Tensor:
        y = self.conv(rearrange(x, "(b f) c h w -> b c f h w", f=frames))
        return rearrange(y, "b c f h w -> (b f) c h w")


def _conv(cfg: UNetConfig, cin: int, cout: int, kernel_size: int = 3, stride: int = 1) -> nn.Module:
    cls = FullConv3d if cfg.conv_type == "full3d" else PseudoConv3d
    return cls(cin, cout, kernel_size, stride, temporal=cfg.temporal, temporal_kernel=cfg.temporal_kernel)


# ----------------------------------------------------------------------------------------------------------------------
# Pseudo-3D attention (Eq. 3)
# ----------------------------------------------------------------------------------------------------------------------
class SpatialAttention(nn.Module):
    """ATTN_2D of Eq. 3: self-attention over the H·W tokens of each frame, then cross-attention to context tokens
    (y_e tokens, text) when the network has any (Imagen / GLIDE); zero-initialised output projections (ADM)."""

    def __init__(self, channels: int, head_channels: int, groups: int, context_dim: int = 0):
        super().__init__()
        heads = channels // head_channels
        self.norm = _norm(channels, groups)
        self.attn = MultiHeadAttention(channels, heads=heads)
        _zero(self.attn.proj)
        if context_dim:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross = CrossAttention(channels, context_dim, heads=heads)
            _zero(self.cross.proj)
        else:
            self.norm_cross = self.cross = None

    def forward(self, x: Tensor, frames: int, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "n c h w -> n (h w) c")
        y = rearrange(x, "n c h w -> n (h w) c") + self.attn(tokens)
        if self.cross is not None and context is not None:
            ctx = repeat(context, "b m d -> (b f) m d", f=frames)
            mask = None if context_mask is None else repeat(context_mask, "b m -> (b f) m", f=frames)
            y = y + self.cross(self.norm_cross(y), ctx, context_mask=mask)
        return rearrange(y, "n (h w) c -> n c h w", h=h, w=w)


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative frame offset ``j - i`` (clipped to ±(max_frames-1)), added to the
    temporal attention logits (VDM-style relative positions; spec §1.3 [unverified choice])."""

    def __init__(self, heads: int, max_frames: int = 64):
        super().__init__()
        self.max_frames = max_frames
        self.bias = nn.Embedding(2 * max_frames - 1, heads)
        nn.init.zeros_(self.bias.weight)

    def forward(self, frames: int, device: torch.device) -> Tensor:
        pos = torch.arange(frames, device=device)
        rel = (pos[None, :] - pos[:, None]).clamp(-(self.max_frames - 1), self.max_frames - 1) + self.max_frames - 1
        return rearrange(self.bias(rel), "i j h -> 1 h i j")


class TemporalAttention(nn.Module):
    """ATTN_1D of Eq. 3: self-attention over the F frames at each spatial position, with a relative position bias;
    residual with a zero-initialised output projection, so the identity at init (§3.2)."""

    def __init__(self, channels: int, head_channels: int, max_frames: int = 64):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))
        self.rel_pos = RelativePositionBias(self.heads, max_frames)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        h, w = x.shape[-2:]
        seq = rearrange(x, "(b f) c h w -> (b h w) f c", f=frames)
        q, k, v = rearrange(self.qkv(self.norm(seq)), "n f (three h d) -> three n h f d", three=3, h=self.heads)
        bias = self.rel_pos(frames, x.device).to(q.dtype)
        out = rearrange(attention(q, k, v, mask=bias), "n h f d -> n f (h d)")
        seq = seq + self.proj(out)
        return rearrange(seq, "(b h w) f c -> (b f) c h w", h=h, w=w)


class PseudoAttention3d(nn.Module):
    """Eq. 3: ``ATTN_P3D(h) = unflatten(ATTN_1D(ATTN_2D(flatten(h)) ∘ T) ∘ T)``; ATTN_1D skipped for images."""

    def __init__(self, cfg: UNetConfig, channels: int, context_dim: int):
        super().__init__()
        self.spatial = SpatialAttention(channels, cfg.num_head_channels, cfg.groups, context_dim)
        self.temporal_attn = TemporalAttention(channels, cfg.num_head_channels, cfg.max_frames) if cfg.temporal else None

    def forward(self, x: Tensor, frames: int, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        x = self.spatial(x, frames, context, context_mask)
        if self.temporal_attn is not None and frames > 1:
            x = self.temporal_attn(x, frames)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Residual blocks and resampling
# ----------------------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, scale-shift from the (timestep + condition) embedding
    (``GN(h)(1 + scale) + shift``), SiLU-dropout-conv (zero-init), 1x1 skip when the width changes."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin, cfg.groups)
        self.conv1 = _conv(cfg, cin, cout)
        self.emb = nn.Linear(cfg.emb_dim, 2 * cout)
        self.norm2 = _norm(cout, cfg.groups)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = _conv(cfg, cout, cout)
        _zero(self.conv2 if cfg.conv_type == "full3d" else self.conv2.spatial)  # ADM zero_module(out conv)
        # a 1x1 skip is a per-pixel fully-connected layer: no temporal part ("FC layers need no change", §3.2)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor, frames: int) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), frames)
        scale, shift = rearrange(self.emb(F.silu(emb)), "n (two c) -> two n c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)), frames)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided (pseudo-3D) 3x3 convolution, factor 2 in space only (ADM ``Downsample(use_conv=True)``)."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.conv = _conv(cfg, channels, channels, 3, stride=2)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        return self.conv(x, frames)


class Upsample(nn.Module):
    """Nearest 2x in space, then a (pseudo-3D) 3x3 convolution (ADM ``Upsample(use_conv=True)``)."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.conv = _conv(cfg, channels, channels, 3)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), frames)


class Level(nn.Module):
    """One encoder/decoder step: a residual block and, at attention levels, a pseudo-3D attention layer."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, attn: bool):
        super().__init__()
        self.res = ResBlock(cfg, cin, cout)
        self.attn = PseudoAttention3d(cfg, cout, cfg.emb_dim if cfg.has_context else 0) if attn else None

    def forward(self, x: Tensor, emb: Tensor, frames: int, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        x = self.res(x, emb, frames)
        if self.attn is not None:
            x = self.attn(x, frames, context, context_mask)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """ADM/Imagen U-Net with optional pseudo-3D temporal layers (Make-A-Video §3.2); see the module docstring.

    ``forward(x, t, cond=None, cond_drop=None, context=None, context_mask=None, fps=None, x_cond=None,
    aug_level=None)``: ``x`` ``[B, C, H, W]`` or ``[B, C, T, H, W]``, ``t`` ``[B]``; ``cond`` ``[B, cond_dim]`` (y_e),
    ``cond_drop`` bool ``[B]`` replaces it by the learned null embedding (classifier-free guidance); ``context``
    ``[B, M, context_dim]`` extra tokens; ``fps`` ``[B]``; ``x_cond`` ``[B, cond_in_channels, (T,) H, W]``;
    ``aug_level`` ``[B]``; ``frame_skip`` ``[B]``. Returns the same layout as ``x`` with ``out_channels`` (x2 with learned sigma).
    """

    def __init__(self, config: UNetConfig | Mapping):
        super().__init__()
        cfg = config if isinstance(config, UNetConfig) else UNetConfig(**dict(config))
        self.config = cfg
        ch, emb = cfg.model_channels, cfg.emb_dim
        self.time_embed = TimestepEmbedder(emb, frequency_embedding_size=ch)
        if cfg.cond_dim:
            self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim))
            self.cond_embed = nn.Sequential(nn.Linear(cfg.cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
            self.cond_tokens = nn.Linear(cfg.cond_dim, cfg.num_cond_tokens * emb) if cfg.num_cond_tokens else None
        if cfg.context_dim:
            self.context_proj = nn.Linear(cfg.context_dim, emb)
        if cfg.has_context:
            self.context_norm = nn.LayerNorm(emb)
        if cfg.fps_cond:  # zero last layer: adding fps conditioning to a trained D leaves it unchanged at init
            self.fps_embed = TimestepEmbedder(emb, frequency_embedding_size=ch)
            _zero(self.fps_embed.mlp[2])
        if cfg.noise_aug_cond:
            self.aug_embed = TimestepEmbedder(emb, frequency_embedding_size=ch)
        if cfg.skip_cond:  # zero last layer: ↑F fine-tuned from D^t starts as D^t (§1.4)
            self.skip_embed = TimestepEmbedder(emb, frequency_embedding_size=ch)
            _zero(self.skip_embed.mlp[2])
        self.input_conv = _conv(cfg, cfg.in_channels + cfg.cond_in_channels, ch)
        if cfg.cond_in_channels:
            with torch.no_grad():  # zero-init the conditioning channels' input weights (↑F / SR, §1.4 [unverified])
                w = self.input_conv.conv.weight if cfg.conv_type == "full3d" else self.input_conv.spatial.weight
                w[:, cfg.in_channels:] = 0
        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        n_levels = len(cfg.channel_mult)
        for lvl, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Level(cfg, cur, ch * mult, lvl in cfg.attention_levels))
                cur = ch * mult
                skips.append(cur)
            if lvl < n_levels - 1:
                self.down.append(Downsample(cfg, cur))
                skips.append(cur)
        self.mid = nn.ModuleList([Level(cfg, cur, cur, True), Level(cfg, cur, cur, False)])
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                self.up.append(Level(cfg, cur + skips.pop(), ch * mult, lvl in cfg.attention_levels))
                cur = ch * mult
                if lvl > 0 and i == cfg.num_res_blocks:
                    self.up.append(Upsample(cfg, cur))
        self.out_norm = _norm(cur, cfg.groups)
        out_ch = cfg.out_channels * (2 if cfg.learn_sigma else 1)
        self.out_conv = _conv(cfg, cur, out_ch)
        _zero(self.out_conv if cfg.conv_type == "full3d" else self.out_conv.spatial)

    # -- parameter groups ------------------------------------------------------------------------------------------
    @staticmethod
    def is_new_video_parameter(name: str) -> bool:
        """True for what D^t adds to D: temporal conv/attention parameters and the fps embedding."""
        return any(p in name for p in NEW_VIDEO_PATTERNS)

    def new_video_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if self.is_new_video_parameter(n))

    def load_image_weights(self, state_dict: Mapping[str, Tensor], source: str = "") -> KeyReport:
        """Load an image U-Net (D) into this network with no conversion; only new video parameters may be missing."""
        return self.load_pretrained(state_dict, source, new=NEW_VIDEO_PATTERNS, kind="image U-Net -> video U-Net")

    def load_pretrained(self, state_dict: Mapping[str, Tensor], source: str = "",
                        new: tuple[str, ...] = NEW_VIDEO_PATTERNS + NEW_INTERP_PATTERNS,
                        kind: str = "U-Net -> U-Net with more inputs") -> KeyReport:
        """Load a trained U-Net into this one: parameters named by ``new`` may be missing (they keep their
        identity/zero init) and the input convolution may be wider here (its first ``in_channels`` input columns are
        loaded, the conditioning columns stay zero: D^t -> ↑F, §1.4). Anything else that does not fit raises."""
        own = self.state_dict()
        sd = dict(state_dict)
        key = "input_conv.conv.weight" if self.config.conv_type == "full3d" else "input_conv.spatial.weight"
        widened = None
        if key in sd and key in own and sd[key].shape != own[key].shape:
            w, mine = sd[key], own[key]
            if (w.shape[0], *w.shape[2:]) == (mine.shape[0], *mine.shape[2:]) and w.shape[1] < mine.shape[1]:
                full = mine.clone()
                full[:, : w.shape[1]] = w
                full[:, w.shape[1]:] = 0
                sd[key] = widened = full
        report = KeyReport.compare(sd, own, source=source, kind=kind, model="unet")
        bad_missing = [k for k, _ in report.missing if not any(p in k for p in new)]
        if bad_missing or report.mismatched or report.unexpected:
            raise ValueError(f"U-Net weights do not fit this network (only {'/'.join(new)} parameters may be new"
                             f"{', and the input convolution wider' if self.config.cond_in_channels else ''}):\n"
                             + report.table())
        self.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
        if widened is not None:
            report.kind += f" (input convolution widened {state_dict[key].shape[1]} -> {widened.shape[1]} channels)"
        return report

    # -- forward ---------------------------------------------------------------------------------------------------
    def embed(self, t: Tensor, cond: Tensor | None, cond_drop: Tensor | None, fps: Tensor | None,
              aug_level: Tensor | None, context: Tensor | None, context_mask: Tensor | None,
              frame_skip: Tensor | None = None):
        """(embedding ``[B, emb]``, context tokens ``[B, M, emb]`` or None, their mask or None)."""
        cfg = self.config
        dtype = self.time_embed.mlp[0].weight.dtype
        emb = self.time_embed(t, dtype)
        tokens, masks = [], []
        if cfg.cond_dim:
            if cond is None:
                raise ValueError(f"this U-Net is conditioned on an embedding of width {cfg.cond_dim}: pass cond")
            cond = cond.to(dtype)
            if cond_drop is not None:
                cond = torch.where(cond_drop.to(cond.device)[:, None], self.null_cond.to(dtype)[None], cond)
            emb = emb + self.cond_embed(cond)
            if self.cond_tokens is not None:
                tokens.append(rearrange(self.cond_tokens(cond), "b (m d) -> b m d", m=cfg.num_cond_tokens))
                masks.append(torch.ones(cond.shape[0], cfg.num_cond_tokens, dtype=torch.bool, device=cond.device))
        if cfg.fps_cond and fps is not None:
            emb = emb + self.fps_embed(fps.float(), dtype)
        if cfg.noise_aug_cond:
            if aug_level is None:
                raise ValueError("noise_aug_cond=True needs aug_level [B] (the low-resolution input's noise level)")
            emb = emb + self.aug_embed(aug_level.float(), dtype)
        if cfg.skip_cond:
            if frame_skip is None:
                raise ValueError("skip_cond=True needs frame_skip [B] (↑F's frame skip, e.g. 5 for 16 -> 76 frames)")
            emb = emb + self.skip_embed(frame_skip.float(), dtype)
        if cfg.context_dim and context is not None:
            tokens.append(self.context_proj(context.to(dtype)))
            m = context_mask if context_mask is not None else torch.ones(context.shape[:2], dtype=torch.bool)
            masks.append(m.to(context.device).bool())
        if not tokens:
            return emb, None, None
        ctx = self.context_norm(torch.cat(tokens, dim=1))
        return emb, ctx, torch.cat(masks, dim=1)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, cond_drop: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None, fps: Tensor | None = None,
                x_cond: Tensor | None = None, aug_level: Tensor | None = None,
                frame_skip: Tensor | None = None) -> Tensor:
        cfg = self.config
        video = x.ndim == 5
        if not video and x.ndim != 4:
            raise ValueError(f"UNet takes [B, C, H, W] images or [B, C, T, H, W] videos, got {tuple(x.shape)}")
        if x.shape[-1] % cfg.downsample_factor or x.shape[-2] % cfg.downsample_factor:
            raise ValueError(f"UNet input {tuple(x.shape[-2:])} must be divisible by {cfg.downsample_factor} "
                             f"(2^(levels-1) for channel_mult {cfg.channel_mult})")
        if cfg.cond_in_channels:
            if x_cond is None or x_cond.shape[1] != cfg.cond_in_channels or x_cond.shape[2:] != x.shape[2:]:
                raise ValueError(f"this U-Net concatenates {cfg.cond_in_channels} conditioning channels: pass x_cond "
                                 f"of shape [B, {cfg.cond_in_channels}, {', '.join(map(str, x.shape[2:]))}]")
            x = torch.cat([x, x_cond.to(x.dtype)], dim=1)
        b = x.shape[0]
        frames = x.shape[2] if video else 1
        emb, ctx, ctx_mask = self.embed(t, cond, cond_drop, fps, aug_level, context, context_mask, frame_skip)
        h = rearrange(x, "b c f h w -> (b f) c h w") if video else x
        emb_f = repeat(emb, "b d -> (b f) d", f=frames)
        h = self.input_conv(h, frames)
        hs = [h]
        for mod in self.down:
            h = mod(h, frames) if isinstance(mod, Downsample) else mod(h, emb_f, frames, ctx, ctx_mask)
            hs.append(h)
        for mod in self.mid:
            h = mod(h, emb_f, frames, ctx, ctx_mask)
        for mod in self.up:
            if isinstance(mod, Upsample):
                h = mod(h, frames)
            else:
                h = mod(torch.cat([h, hs.pop()], dim=1), emb_f, frames, ctx, ctx_mask)
        h = self.out_conv(F.silu(self.out_norm(h)), frames)
        return rearrange(h, "(b f) c h w -> b c f h w", b=b) if video else h


def unet_config(size: str | None = None, **overrides) -> UNetConfig:
    """A ``UNetConfig`` from the size table below plus overrides."""
    base = dict(UNET_SIZES[size]) if size else {}
    unknown = set(overrides) - set(UNetConfig.__dataclass_fields__)
    if unknown:
        raise UNetConfigError(f"unknown unet keys {sorted(unknown)}; allowed: {sorted(UNetConfig.__dataclass_fields__)}")
    return UNetConfig(**{**base, **overrides})


def config_dict(cfg: UNetConfig) -> dict:
    return asdict(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Size table. Make-A-Video publishes no sizes (§1.6); these are DALL-E 2 / Imagen defaults [unverified for MAV].
# ----------------------------------------------------------------------------------------------------------------------
UNET_SIZES: dict[str, dict] = {
    # DALL-E 2 64x64 decoder (GLIDE-like ADM): 512 channels? [unverified]; the Imagen 64x64 base uses 512 x (1,2,3,4),
    # 3 res blocks, attention at 32/16/8. Scaled-down defaults that fit one GPU:
    "base64": dict(model_channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3),
                   num_head_channels=64),
    "imagen64": dict(model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3),
                     num_head_channels=64),
    "small": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                  num_head_channels=32),
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 num_head_channels=16, groups=8),
}
