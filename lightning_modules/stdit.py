"""Open-Sora v1.2 STDiT3: a text-to-video latent diffusion transformer trained with rectified flow.

Spec: latte_tora.md §3 (model §3.1, rectified flow §3.2, VAE §3.3) and the parity notes at its end (§5). The network
keeps the official module and parameter names (``hpcai-tech/OpenSora-STDiT-v3``), so the released weights load
strictly (``STDiT3.load_pretrained``).

The network (§3.1), on latent clips ``x [B, C, T, H, W]``:

1. ``x_embedder``: Conv3d patches (1, 2, 2), inputs padded to multiples of the patch; + the 2D sin-cos table of
   ``PositionEmbedding2D`` computed on the fly for the clip's grid with the scale rule ``scale = sqrt(H_px W_px) / 512``,
   ``base_size = round(sqrt(S))``; no temporal table (time is RoPE).
2. Timestep: ``t = t_embedder(t) + fps_embedder(fps)``; adaLN-single: ``t_mlp = t_block(t)`` is shared by every block,
   each block adds its own ``scale_shift_table`` (6 x d). Frames with ``x_mask`` False (given, clean frames) use the
   parameters of ``t = 0`` instead, in every block and in the final layer.
3. Text: the caption states (T5-XXL, 300 tokens) go through ``y_embedder.y_proj``; during training a caption is
   replaced by the fixed null caption ``y_embedder.y_embedding`` with probability 0.1 (the CFG null). Padded tokens
   are ignored in cross-attention (the official code removes them; attending with a key mask is the same result).
4. Pairs of blocks S_0 T_0 S_1 T_1 ...: ``x += g * SelfAttn(mod(LN(x)))`` over the S tokens of a frame (spatial) or
   over the T frames at one position (temporal, RoPE on q and k after their RMSNorm); ``x += CrossAttn(x, text)``;
   ``x += g * MLP(mod(LN(x)))``.
5. Final layer: ``LN -> mod(scale_shift_table + t) -> Linear(d, p^3 * 2C)``; unpatchify; output float32 ``[B, 2C, T, H, W]``
   (velocity in channels ``[:C]``; the other C are the unused ``pred_sigma`` channels of the official model).

Motion hook (Tora, §4.3): every ``STDiT3Block`` has ``fuser`` (None by default). When it is set and the block receives
a motion feature, the block applies ``x_m = fuser(x_m, motion, T=T, S=S)`` to the adaLN-modulated normalised input
``x_m [B, T*S, d]`` (tokens ordered t, h, w; ``S = H' W'`` the token grid of one frame) right before its
self-attention. ``STDiT3.forward(..., motion=[one entry per temporal block], motion_spatial=[one per spatial block])``.

The LightningModule ``STDiT`` (below the network) trains it with rectified flow (§3.2) on VAE latents (or cached
latent shards), with the frame-mask generator of §3.1, and samples with 30 Euler steps and CFG 7.0.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from vidgen.lightning_modules.nn.init import xavier_linears_
from vidgen.lightning_modules.nn.attention import CrossAttention, Mlp, MultiHeadAttention
from vidgen.lightning_modules.nn.checkpoint import KeyReport, keep_out_of_checkpoints, read_state_dict
from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion, opensora_timestep_shift
from vidgen.lightning_modules.nn.embeddings import RotaryEmbedding, TimestepEmbedder, sincos_2d
from vidgen.lightning_modules.nn.optim import cpu_multi_tensor
from vidgen.lightning_modules.nn.batches import eval_rows
from vidgen.lightning_modules.nn.step_logs import log_step
from vidgen.lightning_modules.nn.text_encoders import TextEncoderConfig, build_text_encoder
from vidgen.lightning_modules.nn.vae import LatentAutoencoder, VAEConfig
from vidgen.lightning_modules.video_tokenizer import latent_autoencoder

__all__ = [
    "STDiTConfigError",
    "STDiT3Config",
    "PatchEmbed3D",
    "CaptionEmbedder",
    "STDiT3Block",
    "T2IFinalLayer",
    "STDiT3",
    "t2i_modulate",
    "FrameMaskGenerator",
    "OPEN_SORA_MASK_RATIOS",
    "STDiT",
    "STDIT3_SIZES",
    "STDIT3_MODELS",
]


class STDiTConfigError(ValueError):
    """An STDiT setting that cannot work; the message names the setting and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# Network config
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class STDiT3Config:
    """The network's shape (official ``STDiT3Config`` field names; sizes: ``STDIT3_SIZES`` at the bottom).

    depth: number of spatial blocks = number of temporal blocks (XL: 28 + 28). caption_channels: text-state width
    (T5-XXL 4096); model_max_length: text tokens (300), the length of the null caption ``y_embedding``.
    input_sq_size: the reference side of the position-table scale rule (512). vae_spatial_factor: pixels per latent
    pixel, used for the pixel size when ``height``/``width`` are not given. default_fps: fps when none is given.
    """

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    caption_channels: int = 4096
    model_max_length: int = 300
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    qk_norm: bool = True
    input_sq_size: int = 512
    vae_spatial_factor: int = 8
    default_fps: float = 24.0

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.validate()

    @classmethod
    def from_size(cls, name: str, **kwargs: Any) -> STDiT3Config:
        """``STDiT3Config.from_size("XL/2", caption_channels=384)``; names as in ``STDIT3_MODELS``."""
        key = name.removeprefix("STDiT3-")
        if key not in STDIT3_MODELS:
            raise STDiTConfigError(f"unknown STDiT3 size {name!r}; choose one of {sorted(STDIT3_MODELS)}")
        return cls(**{**STDIT3_MODELS[key], **kwargs})

    def validate(self) -> None:
        for name in ("hidden_size", "depth", "num_heads", "in_channels", "caption_channels", "model_max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise STDiTConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise STDiTConfigError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size!r}")
        if self.hidden_size % self.num_heads:
            raise STDiTConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise STDiTConfigError(
                f"head dim {self.hidden_size // self.num_heads} must be even (RoPE rotates channel pairs); "
                "change hidden_size or num_heads")
        if self.hidden_size % 4:
            raise STDiTConfigError(f"hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos table)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise STDiTConfigError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------------
def t2i_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN-single modulation (PixArt-alpha, §3.1): ``x (1 + scale) + shift``."""
    return x * (1 + scale) + shift


class PatchEmbed3D(nn.Module):
    """Video patch embedding (§3.1): Conv3d with kernel = stride = patch, the clip zero-padded to multiples of it."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Token grid (T', H', W') of a ``t x h x w`` latent clip (after padding)."""
        pt, ph, pw = self.patch_size
        return -(-t // pt), -(-h // ph), -(-w // pw)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W] -> [B, T'*H'*W', d]`` (tokens ordered t, h, w)."""
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))
        return rearrange(self.proj(x), "b d t h w -> b (t h w) d")


class CaptionEmbedder(nn.Module):
    """Caption projection ``y_proj`` (Mlp C -> d -> d, GELU-tanh) with the null caption ``y_embedding`` (§3.1).

    During training each caption is swapped for ``y_embedding`` (``token_num x C``, randn/sqrt(C), a buffer) with
    probability ``uncond_prob``; the same buffer is the classifier-free-guidance null. The caption's mask is kept.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size, act="gelu_tanh")
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop = force_drop_ids.to(caption.device) == 1
        return torch.where(drop[:, None, None], self.y_embedding.to(caption.dtype), caption)

    def forward(self, caption: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """``[B, L, C] -> [B, L, d]``."""
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if tuple(caption.shape[1:]) != tuple(self.y_embedding.shape):
                raise ValueError(
                    f"captions of shape [L, C] = {list(caption.shape[1:])} cannot be swapped for the null caption "
                    f"{list(self.y_embedding.shape)}: pad/truncate the text to model_max_length="
                    f"{self.y_embedding.shape[0]} tokens (text_encoder.max_length)")
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------
def _frame_modulation(table: Tensor, t_mlp: Tensor, x_mask: Tensor | None, t0_mlp: Tensor | None) -> Tensor:
    """Per-frame adaLN-single parameters ``[B, T|1, 1, k, d]``: ``table + t_mlp``, and ``table + t0_mlp`` on the
    frames where ``x_mask`` is False (§3.1 x_mask / t0)."""
    k = table.shape[0]
    mods = table[None] + rearrange(t_mlp, "b (k d) -> b k d", k=k)
    mods = mods[:, None]
    if x_mask is not None:
        if t0_mlp is None:
            raise ValueError("x_mask needs t0_mlp, the t = 0 modulation")
        mods0 = table[None] + rearrange(t0_mlp, "b (k d) -> b k d", k=k)
        mods = torch.where(rearrange(x_mask.bool(), "b t -> b t 1 1"), mods, mods0[:, None])
    return mods[:, :, None]  # [B, T|1, 1(tokens), k, d]


class STDiT3Block(nn.Module):
    """One ST-DiT block (§3.1): modulated self-attention (spatial or temporal), cross-attention, modulated MLP.

    ``temporal=False``: self-attention over the S tokens of each frame; ``temporal=True``: over the T frames at each
    token position, with the ``rope`` the network passes in (RoPE only here). ``fuser``: the optional motion-guidance
    fuser (Tora §4.3), applied as ``x_m = fuser(x_m, motion, T=T, S=S)`` before the self-attention when a motion
    feature is given.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 temporal: bool = False):
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = MultiHeadAttention(hidden_size, num_heads, qkv_bias=True, qk_norm="rms" if qk_norm else False)
        self.cross_attn = CrossAttention(hidden_size, heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.fuser: nn.Module | None = None

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t_mlp: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        t0_mlp: Tensor | None = None,
        T: int | None = None,
        S: int | None = None,
        rope: RotaryEmbedding | None = None,
        motion: Tensor | None = None,
    ) -> Tensor:
        """``x [B, T*S, d]``, text ``y [B, M, d]`` with ``mask [B, M]`` (True = real token), ``t_mlp [B, 6d]``."""
        if T is None or S is None or T * S != x.shape[1]:
            raise ValueError(f"STDiT3Block needs T and S with T*S = {x.shape[1]} tokens, got T={T}, S={S}")
        mods = _frame_modulation(self.scale_shift_table, t_mlp, x_mask, t0_mlp).to(x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(-2)  # each [B, T|1, 1, d]
        grid = (lambda v: rearrange(v, "b (t s) d -> b t s d", t=T))  # modulation is per frame
        flat = (lambda v: rearrange(v, "b t s d -> b (t s) d"))

        x_m = t2i_modulate(self.norm1(grid(x)), shift_msa, scale_msa)
        if self.fuser is not None and motion is not None:
            x_m = grid(self.fuser(flat(x_m), motion, T=T, S=S))
        if self.temporal:
            x_m = rearrange(self.attn(rearrange(x_m, "b t s d -> (b s) t d"), rope=rope), "(b s) t d -> b t s d", t=T, s=S)
        else:
            x_m = rearrange(self.attn(rearrange(x_m, "b t s d -> (b t) s d")), "(b t) s d -> b t s d", t=T, s=S)
        x = x + flat(gate_msa * x_m)  # out of place throughout: the block never returns a view (FSDP2 hooks)

        x = x + self.cross_attn(x, y, mask)

        x_m = t2i_modulate(self.norm2(grid(x)), shift_mlp, scale_mlp)
        return x + flat(gate_mlp * self.mlp(x_m))


class T2IFinalLayer(nn.Module):
    """PixArt final layer (§3.1): LN -> modulate with ``scale_shift_table + t`` (t = the embedded timestep, not t_mlp)
    -> ``Linear(d, prod(patch) * C_out)``; frames with ``x_mask`` False are then normalised and modulated once more
    with t0 (the official v1.2 order, checked against its code: benchmarks/opensora_parity.py)."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    def forward(self, x: Tensor, t: Tensor, x_mask: Tensor | None = None, t0: Tensor | None = None,
                T: int | None = None, S: int | None = None) -> Tensor:
        both = (lambda v: repeat(v, "b d -> b (two d)", two=2))  # t is added to shift AND scale
        shift, scale = _frame_modulation(self.scale_shift_table, both(t), None, None).to(x.dtype).unbind(-2)
        out = t2i_modulate(self.norm_final(rearrange(x, "b (t s) d -> b t s d", t=T)), shift, scale)
        if x_mask is not None:
            if t0 is None:
                raise ValueError("x_mask needs t0, the t = 0 embedding")
            # As the official v1.2 T2IFinalLayer: the t0 frames normalise and modulate the ALREADY t-modulated
            # activations (LN -> mod_t -> LN -> mod_t0), not LN(x) afresh. Only the given frames' outputs see it.
            shift0, scale0 = _frame_modulation(self.scale_shift_table, both(t0), None, None).to(x.dtype).unbind(-2)
            out0 = t2i_modulate(self.norm_final(out), shift0, scale0)
            out = torch.where(rearrange(x_mask.bool(), "b t -> b t 1 1"), out, out0)
        return rearrange(self.linear(out), "b t s d -> b (t s) d")


# ----------------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------------
class STDiT3(nn.Module):
    """Open-Sora v1.2 STDiT3 (§3.1) with the official parameter names; see the module docstring."""

    def __init__(self, config: STDiT3Config | Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__()
        if config is None or isinstance(config, Mapping):
            config = STDiT3Config(**{**dict(config or {}), **overrides})
        elif overrides:
            raise TypeError("pass either an STDiT3Config or keyword fields, not both")
        self.config = cfg = config
        d = cfg.hidden_size
        self.in_channels, self.out_channels, self.patch_size = cfg.in_channels, cfg.out_channels, cfg.patch_size
        # one RoPE for all temporal blocks; its frequencies are in the state dict as ``rope.freqs`` (official)
        self.rope = RotaryEmbedding(cfg.head_dim, persistent=True)
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.fps_embedder = TimestepEmbedder(d)  # Open-Sora SizeEmbedder: the same sinusoid + MLP, on fps
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, d, cfg.class_dropout_prob, cfg.model_max_length)
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, temporal=False) for _ in range(cfg.depth)])
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, temporal=True) for _ in range(cfg.depth)])
        self.final_layer = T2IFinalLayer(d, math.prod(cfg.patch_size), self.out_channels)
        self.initialize_weights()

    # -- §3.1 initialisation ----------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """The official init: xavier-uniform Linears with zero biases; fps embedder N(0, 0.02) in, zero out; in the
        temporal blocks zero ``attn.proj``, ``cross_attn.proj`` and ``mlp.fc2`` weights, so each temporal block starts
        as the identity (a spatial-only model, e.g. PixArt, is unchanged by adding them)."""

        xavier_linears_(self)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.constant_(self.fps_embedder.mlp[0].bias, 0)
        nn.init.constant_(self.fps_embedder.mlp[2].weight, 0)
        nn.init.constant_(self.fps_embedder.mlp[2].bias, 0)
        for block in self.temporal_blocks:
            nn.init.constant_(block.attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.mlp.fc2.weight, 0)

    # -- helpers -------------------------------------------------------------------------------------------------------
    def null_caption(self, batch: int) -> Tensor:
        """The CFG null text ``y_embedding`` repeated: ``[B, L, C]``."""
        return repeat(self.y_embedder.y_embedding, "l c -> b l c", b=batch)

    def pos_embed(self, grid_h: int, grid_w: int, height: float, width: float) -> Tensor:
        """Open-Sora ``PositionEmbedding2D`` for an ``grid_h x grid_w`` token grid of an ``height x width``-pixel clip:
        ``scale = sqrt(H W) / input_sq_size``, ``base_size = round(sqrt(S))`` -> ``[S, d]``."""
        scale = math.sqrt(float(height) * float(width)) / self.config.input_sq_size
        base_size = round((grid_h * grid_w) ** 0.5)
        return sincos_2d(self.config.hidden_size, (grid_h, grid_w), scale=scale, base_size=base_size)

    def encode_text(self, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Project the caption states (null-caption dropout in training) and drop the columns that are padding in
        every caption. Returns ``(y [B, M, d], mask [B, M] bool or None)``."""
        if y.ndim == 4:
            if y.shape[1] != 1:
                raise ValueError(f"text states must be [B, 1, L, C] or [B, L, C], got {tuple(y.shape)}")
            y = y[:, 0]
        if y.ndim != 3 or y.shape[-1] != self.config.caption_channels:
            raise ValueError(
                f"text states must be [B, L, {self.config.caption_channels}] (caption_channels), got {tuple(y.shape)}")
        y = self.y_embedder(y, self.training)
        if mask is None:
            return y, None
        mask = mask.reshape(mask.shape[0], -1).bool().to(y.device)
        if mask.shape[0] != y.shape[0]:  # official: one mask repeated over a doubled (CFG) batch
            mask = repeat(mask, "b l -> (r b) l", r=y.shape[0] // mask.shape[0])
        if mask.shape != y.shape[:2]:
            raise ValueError(f"text mask {tuple(mask.shape)} does not match the text states {tuple(y.shape[:2])}")
        if not bool(mask.any(1).all()):
            raise ValueError("a caption has no tokens (its mask is all False); every caption needs at least one token")
        keep = mask.any(0)
        y, mask = y[:, keep], mask[:, keep]
        return y, (None if bool(mask.all()) else mask)

    @staticmethod
    def _per_block(motion: Sequence[Tensor | None] | None, n: int, name: str) -> list[Tensor | None]:
        if motion is None:
            return [None] * n
        motion = list(motion)
        if len(motion) != n:
            raise ValueError(f"{name} needs one entry (a Tensor or None) per block: {n}, got {len(motion)}")
        return motion

    # -- forward -------------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        fps: Tensor | float | None = None,
        height: Tensor | float | None = None,
        width: Tensor | float | None = None,
        motion: Sequence[Tensor | None] | None = None,
        motion_spatial: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """Velocity (+ unused sigma channels) ``[B, out_channels, T, H, W]`` (float32) for latents ``x [B, C, T, H, W]``.

        timestep: ``[B]`` on the 0..1000 scale. y: text states ``[B, 1, L, C]`` or ``[B, L, C]``; mask: ``[B, L]``
        (True = real token; None = all real). x_mask: ``[B, T]`` bool, True = generated (noised) latent frame,
        False = given clean frame (t = 0 modulation). fps: ``[B]`` or a float (default ``config.default_fps``).
        height/width: the PIXEL size of the clip (``[B]`` or float; as the official code, only the first sample's
        value is used); default latent size x ``vae_spatial_factor``. motion / motion_spatial: one entry per
        temporal / spatial block for the blocks' ``fuser``.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"STDiT3 expects latents [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        dtype = self.x_embedder.proj.weight.dtype
        b, _, tx, hx, wx = x.shape
        x = x.to(dtype)
        timestep = timestep.to(x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        T, H, W = self.x_embedder.grid(tx, hx, wx)
        S = H * W
        if x_mask is not None:
            x_mask = x_mask.to(x.device).bool()
            if x_mask.shape != (b, tx) or cfg.patch_size[0] != 1:
                raise ValueError(f"x_mask must be bool [B, T] = [{b}, {tx}] (temporal patch 1), got {tuple(x_mask.shape)}")

        def first(v: Tensor | float | None, default: float) -> float:
            if v is None:
                return default
            return float(v.reshape(-1)[0].item()) if isinstance(v, Tensor) else float(v)

        height = first(height, hx * cfg.vae_spatial_factor)
        width = first(width, wx * cfg.vae_spatial_factor)
        pos = self.pos_embed(H, W, height, width).to(x.device, dtype)

        fps = torch.as_tensor(cfg.default_fps if fps is None else fps, device=x.device, dtype=torch.float32)
        fps = fps.reshape(-1).expand(b) if fps.numel() == 1 else fps.reshape(b)
        fps_emb = self.fps_embedder(fps, dtype=dtype)
        t = self.t_embedder(timestep, dtype=dtype) + fps_emb
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype=dtype) + fps_emb
            t0_mlp = self.t_block(t0)

        y, y_mask = self.encode_text(y.to(x.device, dtype), mask)

        h = rearrange(self.x_embedder(x), "b (t s) d -> b t s d", t=T) + pos
        h = rearrange(h, "b t s d -> b (t s) d")
        motion_t = self._per_block(motion, len(self.temporal_blocks), "motion")
        motion_s = self._per_block(motion_spatial, len(self.spatial_blocks), "motion_spatial")
        for spatial, temporal, m_s, m_t in zip(self.spatial_blocks, self.temporal_blocks, motion_s, motion_t):
            h = spatial(h, y, t_mlp, y_mask, x_mask, t0_mlp, T, S, motion=m_s)
            h = temporal(h, y, t_mlp, y_mask, x_mask, t0_mlp, T, S, rope=self.rope, motion=m_t)

        h = self.final_layer(h, t, x_mask, t0, T, S)
        pt, ph, pw = cfg.patch_size
        out = rearrange(h, "b (nt nh nw) (pt ph pw c) -> b c (nt pt) (nh ph) (nw pw)",
                        nt=T, nh=H, nw=W, pt=pt, ph=ph, pw=pw)
        return out[:, :, :tx, :hx, :wx].float()

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def load_pretrained(self, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True) -> KeyReport:
        """Load Open-Sora v1.2 STDiT3 weights (``hpcai-tech/OpenSora-STDiT-v3`` ``model.safetensors``, or a
        ``.pt``/``.ckpt`` with the same keys, or a state dict) and return the ``KeyReport``.

        ``strict=True`` raises (with the key table) unless every key matches in name and shape; ``strict=False`` loads
        the matching keys and keeps the rest at init (e.g. a PixArt init or a different caption width)."""
        sd = read_state_dict(source) if not isinstance(source, Mapping) else dict(source)
        own = self.state_dict()
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
        report = KeyReport.compare(sd, own, source=name, kind="Open-Sora STDiT3", model="STDiT3")
        if strict and not report.exact:
            raise KeyError("STDiT3 weights do not match this network exactly (check the size / caption_channels / "
                           "model_max_length, or load with strict=False):\n" + report.table())
        self.load_state_dict({k: sd[k] for k in report.loaded}, strict=strict)
        return report


# ----------------------------------------------------------------------------------------------------------------------
# Frame conditioning masks (§3.1 x_mask)
# ----------------------------------------------------------------------------------------------------------------------
MASK_TYPES = ("identity", "quarter_random", "quarter_head", "quarter_tail", "quarter_head_tail", "image_random",
              "image_head", "image_tail", "image_head_tail", "random", "interpolate")

#: Open-Sora v1.2 ``mask_ratios`` (configs/opensora-v1-2/train/stage{1,3}.py); the remainder is "identity"
OPEN_SORA_MASK_RATIOS: dict[str, dict[str, float]] = {
    "stage1": {"random": 0.05, "interpolate": 0.005, "quarter_random": 0.005, "quarter_head": 0.005,
               "quarter_tail": 0.005, "quarter_head_tail": 0.005, "image_random": 0.025, "image_head": 0.05,
               "image_tail": 0.025, "image_head_tail": 0.025},
    "stage3": {"random": 0.01, "interpolate": 0.002, "quarter_random": 0.002, "quarter_head": 0.002,
               "quarter_tail": 0.002, "quarter_head_tail": 0.002, "image_random": 0.0, "image_head": 0.22,
               "image_tail": 0.005, "image_head_tail": 0.005},
}


class FrameMaskGenerator:
    """Open-Sora's ``MaskGenerator`` (§3.1): per sample, a mask type drawn with ``mask_ratios``, giving ``x_mask [T]``
    (True = generated, False = a given clean frame). ``quarter_*`` give 1..T//4 frames, ``image_*`` one frame,
    ``interpolate`` every other frame (from 0 or 1), ``random`` keeps each frame with probability 1 - U(0.1, 0.9)
    (at least the last one generated). Clips of one latent frame are never masked. (Official name of
    "interpolate": "intepolate"; both are accepted.)
    """

    def __init__(self, mask_ratios: Mapping[str, float] | str):
        ratios = OPEN_SORA_MASK_RATIOS[mask_ratios] if isinstance(mask_ratios, str) and mask_ratios in OPEN_SORA_MASK_RATIOS else mask_ratios
        if isinstance(ratios, str):
            raise STDiTConfigError(f"mask_ratios={ratios!r}: give a dict or one of {sorted(OPEN_SORA_MASK_RATIOS)}")
        ratios = {("interpolate" if k == "intepolate" else k): float(v) for k, v in dict(ratios).items()}
        bad = sorted(set(ratios) - set(MASK_TYPES))
        if bad:
            raise STDiTConfigError(f"mask_ratios has unknown mask types {bad}; allowed: {list(MASK_TYPES)}")
        if any(not 0.0 <= v <= 1.0 for v in ratios.values()):
            raise STDiTConfigError(f"mask_ratios values must be probabilities in [0, 1], got {ratios}")
        if "identity" not in ratios:
            ratios["identity"] = 1.0 - sum(ratios.values())
        if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6) or ratios["identity"] < -1e-9:
            raise STDiTConfigError(f"mask_ratios must sum to 1 (identity fills the rest), got {ratios}")
        self.mask_ratios = ratios

    def mask_types(self, batch: int, generator: torch.Generator | None = None) -> list[str]:
        names = list(self.mask_ratios)
        probs = torch.tensor([max(self.mask_ratios[n], 0.0) for n in names], dtype=torch.float64)
        idx = torch.multinomial(probs, batch, replacement=True, generator=generator)
        return [names[i] for i in idx.tolist()]

    @staticmethod
    def frame_mask(name: str, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
        """The ``[T]`` bool mask of one mask type (official ``get_mask``)."""
        mask = torch.ones(num_frames, dtype=torch.bool)
        if num_frames <= 1 or name == "identity":
            return mask

        def randint(lo: int, hi: int) -> int:  # inclusive, as random.randint
            return int(torch.randint(lo, hi + 1, (1,), generator=generator))

        quarter = max(num_frames // 4, 1)
        if name == "quarter_random":
            size = randint(1, quarter)
            pos = randint(0, num_frames - size)
            mask[pos: pos + size] = False
        elif name == "image_random":
            mask[randint(0, num_frames - 1)] = False
        elif name in ("quarter_head", "image_head"):
            mask[: randint(1, quarter) if name == "quarter_head" else 1] = False
        elif name in ("quarter_tail", "image_tail"):
            mask[-(randint(1, quarter) if name == "quarter_tail" else 1):] = False
        elif name in ("quarter_head_tail", "image_head_tail"):
            size = randint(1, quarter) if name == "quarter_head_tail" else 1
            mask[:size] = False
            mask[-size:] = False
        elif name == "interpolate":
            mask[randint(0, 1)::2] = False
        elif name == "random":
            ratio = 0.1 + 0.8 * float(torch.rand((), generator=generator))
            mask = torch.rand(num_frames, generator=generator) > ratio
            if not mask.any():
                mask[-1] = True
        return mask

    def __call__(self, batch: int, num_frames: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """``[B, T]`` bool x_mask (True = generated)."""
        names = self.mask_types(batch, generator)
        return torch.stack([self.frame_mask(n, num_frames, generator) for n in names]).to(device)


# ----------------------------------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------------------------------
def _pixel_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        return int(resolution[0]), int(resolution[1])
    raise STDiTConfigError(f"resolution must be an int or [height, width], got {resolution!r}")


class STDiT(L.LightningModule):
    """Open-Sora v1.2 text-to-video training and sampling with STDiT3 (§3): rectified flow on VAE latents.

    Args:
        size: STDiT3 size (``STDIT3_MODELS``: S/2, B/2, L/2, XL/2, 3B/2); ``depth``/``hidden_size``/``num_heads``
            override it (tiny models). qk_norm, class_dropout_prob (caption -> null caption, 0.1): §3.1.
        text_encoder: ``TextEncoderConfig`` fields (default T5-XXL from a LOCAL dir: kind hf, 300 tokens). The
            caption width and token count of the network follow the encoder.
        vae: ``VAEConfig`` fields: a causal 3D VAE (kind tokenizer, 4x time / 8x space: 17 -> 5 latent frames), or a
            2D one. ``batch["latents"]`` (cached raw latents [B, C, t, h, w]) is used when present.
        diffusion: extra ``DiffusionConfig`` fields (process 'flow': logit-normal t). use_timestep_transform: the
            resolution/length shift of §3.2 (``opensora_timestep_shift``) in training and sampling.
        mask_ratios: frame-conditioning masks (``FrameMaskGenerator``): 'stage1', 'stage3', a dict, or None (off).
        num_frames, resolution, fps: the clip ``generate()`` makes without a batch (linked from the data config).
        sample_steps (30), cfg_scale (7.0): Euler sampling with classifier-free guidance against the null caption
            under the conditional caption's mask. caption_suffix: appended to every caption (Open-Sora v1.2 appends
            e.g. " aesthetic score: 6.5.").
        lr (1e-4), weight_decay (0), betas, eps (1e-15), warmup_steps (1000): AdamW (Open-Sora HybridAdam in AdamW
            mode) with linear warmup. Gradient clipping (1.0) is the trainer's ``gradient_clip_val``.
        init_from, init_strict: Open-Sora STDiT3 weights (safetensors) to start from; strict by default.
        freeze_y_embedder: keep the caption projection frozen (v1.2 training).
        num_samples, prompts: what ``generate()`` makes without a batch.
    """

    fsdp_block_classes = (STDiT3Block,)

    def __init__(
        self,
        size: str = "XL/2",
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        class_dropout_prob: float = 0.1,
        text_encoder: dict | None = None,
        vae: dict | None = None,
        diffusion: dict | None = None,
        use_timestep_transform: bool = True,
        mask_ratios: dict | str | None = None,
        num_frames: int = 51,
        resolution: int | list[int] = 256,
        fps: float = 24.0,
        sample_steps: int = 30,
        cfg_scale: float = 7.0,
        caption_suffix: str = "",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-15,
        warmup_steps: int = 1000,
        init_from: str | None = None,
        init_strict: bool = True,
        freeze_y_embedder: bool = False,
        num_samples: int = 4,
        prompts: list[str] | None = None,
        sample_fps: float = 8.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.validate_config(dict(self.hparams))
        self.vae = latent_autoencoder(vae or {})
        self.text_encoder = build_text_encoder(self._text_config(text_encoder))
        net = dict(STDIT3_MODELS[size])
        net.update({k: v for k, v in (("depth", depth), ("hidden_size", hidden_size), ("num_heads", num_heads))
                    if v is not None})
        self.config = STDiT3Config(
            **net, mlp_ratio=mlp_ratio, qk_norm=qk_norm, class_dropout_prob=class_dropout_prob,
            in_channels=self.vae.latent_channels, caption_channels=self.text_encoder.token_dim,
            model_max_length=self.text_encoder.max_length, vae_spatial_factor=self.vae.spatial_factor,
            default_fps=fps)
        self.model = STDiT3(self.config)
        self.diffusion = create_diffusion(DiffusionConfig(
            **{"process": "flow", "learn_sigma": self.config.pred_sigma, "sample_steps": sample_steps,
               **(diffusion or {})}))
        self.mask_generator = FrameMaskGenerator(mask_ratios) if mask_ratios else None
        keep_out_of_checkpoints(
            self, [f"{n}." for n in ("vae", "text_encoder") if getattr(getattr(self, n), "from_file", False)])
        self.load_report: KeyReport | None = None
        if init_from:
            self.load_report = self.model.load_pretrained(init_from, strict=init_strict)
            print(self.load_report.table(), flush=True)
        if freeze_y_embedder:
            self.model.y_embedder.requires_grad_(False)

    @staticmethod
    def _text_config(text_encoder: dict | None) -> dict:
        return {"kind": "hf", "max_length": 300, **(text_encoder or {})}

    @classmethod
    def validate_config(cls, args: Mapping[str, Any]) -> None:
        """Raise ``STDiTConfigError`` naming the setting and the fix; reads no weights (checks that paths exist)."""
        a = {**_DEFAULTS, **dict(args)}
        if a["size"] not in STDIT3_MODELS:
            raise STDiTConfigError(f"size={a['size']!r} is not allowed; choose one of {sorted(STDIT3_MODELS)}")
        net = dict(STDIT3_MODELS[a["size"]])
        net.update({k: a[k] for k in ("depth", "hidden_size", "num_heads") if a[k] is not None})
        STDiT3Config(**net, mlp_ratio=a["mlp_ratio"], class_dropout_prob=a["class_dropout_prob"])
        if a["mask_ratios"]:
            FrameMaskGenerator(a["mask_ratios"])
        _pixel_size(a["resolution"])
        for key in ("num_frames", "sample_steps", "num_samples"):
            if not isinstance(a[key], int) or a[key] < 1:
                raise STDiTConfigError(f"{key} must be a positive integer, got {a[key]!r}")
        if a["cfg_scale"] != 1.0 and a["class_dropout_prob"] <= 0 and not a["init_from"]:
            raise STDiTConfigError("cfg_scale != 1 needs a trained null caption: set class_dropout_prob > 0 (0.1)")
        if a["warmup_steps"] < 0:
            raise STDiTConfigError(f"warmup_steps must be >= 0, got {a['warmup_steps']}")
        try:
            VAEConfig.coerce(a["vae"]).validate()
            TextEncoderConfig(**cls._text_config(a["text_encoder"])).validate()
            DiffusionConfig(**{"process": "flow", "sample_steps": a["sample_steps"], **(a["diffusion"] or {})})
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise STDiTConfigError(str(e)) from None
        if (DiffusionConfig(**{"process": "flow", **(a["diffusion"] or {})}).process != "flow"):
            raise STDiTConfigError("STDiT trains with rectified flow: diffusion.process must be 'flow'")
        if a["init_from"] and not os.path.isfile(a["init_from"]):
            raise STDiTConfigError(f"init_from {a['init_from']!r} does not exist (weights load from local files)")

    # -- data ----------------------------------------------------------------------------------------------------------
    def latents(self, batch: Mapping[str, Any]) -> Tensor:
        """Scaled latents ``[B, C, t, h, w]``: ``batch["latents"]`` (raw cached latents; the VAE's scale factor is
        applied) or the VAE encoding of ``batch["video"]``."""
        if batch.get("latents") is not None:
            return batch["latents"].to(self.device, torch.float32) * self.vae.scale_factor
        if batch.get("video") is None:
            raise ValueError("STDiT needs batch['video'] ([B, C, T, H, W] in [-1, 1]) or batch['latents']")
        return self.vae.encode(batch["video"].to(self.device))

    def pixel_frames(self, latent_frames: int) -> int:
        """Video frames behind ``latent_frames`` (causal 4x VAE: 5 -> 17; with micro chunks of 17: 15 -> 51)."""
        return self.vae.video_frames(latent_frames)

    def encode_text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Caption states ``[B, L, C]`` and mask ``[B, L]`` from the frozen text encoder (suffix appended)."""
        suffix = self.hparams.caption_suffix
        enc = self.text_encoder([f"{s}{suffix}" for s in texts])
        return enc.tokens.to(self.device), enc.mask.to(self.device)

    def model_kwargs(self, batch: Mapping[str, Any], z: Tensor) -> dict[str, Any]:
        """The network's kwargs for a batch: text states + mask, fps and the pixel size."""
        b = z.shape[0]
        texts = list(batch.get("text") or [])
        if len(texts) != b:
            raise ValueError(f"STDiT is text-conditional: batch['text'] must hold {b} captions, got {len(texts)}")
        y, mask = self.encode_text(texts)
        fps = batch.get("fps")
        fps = torch.as_tensor(fps, dtype=torch.float32, device=self.device).reshape(-1).expand(b) if fps is not None \
            else torch.full((b,), float(self.hparams.fps), device=self.device)
        sf = self.vae.spatial_factor
        height = torch.full((b,), float(z.shape[-2] * sf), device=self.device)
        width = torch.full((b,), float(z.shape[-1] * sf), device=self.device)
        return {"y": y, "mask": mask, "fps": fps.contiguous(), "height": height, "width": width}

    def timestep_shift(self, kwargs: Mapping[str, Any], latent_frames: int) -> Tensor | float:
        """§3.2 shift r per sample (1.0 when ``use_timestep_transform`` is off): ``sqrt(H W / 512^2) sqrt(T')`` with
        Open-Sora's ``T' = num_frames // 17 * 5``. Clips shorter than 17 frames (outside Open-Sora's buckets, where
        that rule gives T' = 0) use T' = their latent frame count [our choice]."""
        if not self.hparams.use_timestep_transform:
            return 1.0
        frames = self.pixel_frames(latent_frames)
        if 1 < frames < 17:
            r = opensora_timestep_shift(kwargs["height"], kwargs["width"], 1) * math.sqrt(latent_frames)
        else:
            r = opensora_timestep_shift(kwargs["height"], kwargs["width"], frames)
        return r.to(self.device)

    # -- training ------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return self.model(x, t, **kwargs)

    def loss_terms(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                   x_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Rectified-flow terms of a batch (§3.2): logit-normal shifted t, v = x0 - eps on the generated frames; given
        frames (x_mask False) are clean inputs with t0 modulation and stay out of the loss."""
        x0 = self.latents(batch)
        kwargs = self.model_kwargs(batch, x0)
        b, _, t = x0.shape[:3]
        if x_mask is None and self.mask_generator is not None and self.training:
            x_mask = self.mask_generator(b, t, generator=generator, device=self.device)
        mask = None
        if x_mask is not None:
            kwargs["x_mask"] = x_mask
            mask = rearrange(x_mask, "b t -> b 1 t 1 1")
        return self.diffusion.training_losses(self.model, x0, kwargs, generator=generator,
                                              shift=self.timestep_shift(kwargs, t), mask=mask)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.loss_terms(batch)
        loss = terms["loss"].mean()
        b = terms["loss"].shape[0]
        log_step(self, {"train/loss": loss}, b)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch, n = eval_rows(batch)  # DDP padding dropped (all padding: one row logged with weight 0)
        g = torch.Generator().manual_seed(1000 + batch_idx)  # the same t and noise at every validation
        terms = self.loss_terms(batch, generator=g)
        loss = terms["loss"].mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the network's parameters that require gradients."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        hp = self.hparams
        params = self.trainable_parameters()
        opt = cpu_multi_tensor(torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas),
                                                 eps=hp.eps))
        warmup = int(hp.warmup_steps)
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- sampling ------------------------------------------------------------------------------------------------------
    def latent_shape(self, batch: Mapping[str, Any] | None) -> tuple[int, int, int, int]:
        """(C, t, h, w) of the samples: the batch's clips when it has them, else num_frames x resolution."""
        if batch is not None and batch.get("latents") is not None:
            return tuple(batch["latents"].shape[1:])
        if batch is not None and batch.get("video") is not None:
            _, _, f, hh, ww = batch["video"].shape
            return self.vae.latent_shape(f, hh, ww)
        h, w = _pixel_size(self.hparams.resolution)
        return self.vae.latent_shape(self.hparams.num_frames, h, w)

    @torch.no_grad()
    def generate(
        self, batch: dict | None = None, num_samples: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Videos ``[B, C, T, H, W]`` in [-1, 1] for ``batch["text"]`` (else ``prompts``): 30 Euler steps of the
        shifted rectified flow with CFG (null caption under the prompt's mask), decoded by the VAE.

        Frame conditioning: with ``batch["x_mask"]`` ([B, t] bool over latent frames, False = given), the given
        frames are taken from the batch's latents/video, kept clean and modulated with t = 0."""
        texts = list((batch or {}).get("text") or self.hparams.prompts or [])
        if num_samples is None:
            num_samples = len(texts) if texts else self.hparams.num_samples
        if not texts:
            raise ValueError("STDiT generates from captions: pass batch['text'] or set model prompts")
        texts = (texts * math.ceil(num_samples / len(texts)))[:num_samples]
        c, t, h, w = self.latent_shape(batch)
        shape = (num_samples, c, t, h, w)
        known = known_mask = None
        x_mask = (batch or {}).get("x_mask")
        if x_mask is not None:
            x_mask = x_mask[:num_samples].to(self.device).bool()
            known = self.latents({k: (v[:num_samples] if isinstance(v, Tensor) else v) for k, v in batch.items()})
            known_mask = rearrange(x_mask, "b t -> b 1 t 1 1")
        sub = {"text": texts, "fps": None if batch is None or batch.get("fps") is None else batch["fps"][:num_samples]}
        kwargs = self.model_kwargs(sub, torch.empty(shape, device="meta"))
        uncond = {**kwargs, "y": self.model.null_caption(num_samples).to(self.device)}  # the prompt's mask kept
        if x_mask is not None:
            kwargs["x_mask"] = uncond["x_mask"] = x_mask
        was_training = self.model.training
        self.model.eval()
        try:
            z = self.diffusion.sample(
                self.model, shape, steps=self.hparams.sample_steps, cfg_scale=self.hparams.cfg_scale,
                guided_channels=c, generator=generator, model_kwargs=kwargs,
                uncond_kwargs=uncond if self.hparams.cfg_scale != 1.0 else None, device=self.device,
                shift=self.timestep_shift(kwargs, t), known=known, known_mask=known_mask)
        finally:
            self.model.train(was_training)
        return self.vae.decode(z).clamp(-1, 1)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"videos", "keys", "captions"}`` for the batch's captions (the prediction writer saves them)."""
        g = torch.Generator().manual_seed(batch_idx * 100003 + self.global_rank)
        videos = self.generate(batch, generator=g)
        n = videos.shape[0]
        keys = list(batch.get("key") or [])[:n]
        keys += [f"{batch_idx:05d}_{i:03d}" for i in range(len(keys), n)]
        captions = list(batch.get("text") or self.hparams.prompts or [])[:n]
        return {"videos": videos, "keys": keys, "captions": captions}


# ----------------------------------------------------------------------------------------------------------------------
# Size table (§3.1): depth = spatial blocks = temporal blocks; MLP ratio 4; patch (1, 2, 2)
# ----------------------------------------------------------------------------------------------------------------------
STDIT3_SIZES: dict[str, tuple[int, int, int]] = {
    #        depth  hidden  heads
    "S": (12, 384, 6),  # [our choice] DiT-S widths, for tests/benchmarks
    "B": (12, 768, 12),  # [our choice]
    "L": (24, 1024, 16),  # [our choice]
    "XL": (28, 1152, 16),  # official STDiT3-XL/2, ~1.1B parameters with T5-XXL caption_channels 4096
    "3B": (28, 1872, 26),  # official STDiT3-3B/2
}

STDIT3_MODELS: dict[str, dict[str, Any]] = {
    f"{s}/2": {"depth": d, "hidden_size": h, "num_heads": n, "patch_size": (1, 2, 2)}
    for s, (d, h, n) in STDIT3_SIZES.items()
}

_DEFAULTS = {name: p.default for name, p in inspect.signature(STDiT.__init__).parameters.items() if name != "self"}
