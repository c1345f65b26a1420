"""VideoPoet (Kondratyuk et al., ICML 2024): a decoder-only prefix language model over one token vocabulary
(spec make_a_video_videopoet.md Part 2).

Reading order, as in the paper:

1. :class:`Vocabulary` — §2.3/§2.4: 256 special and task tokens, the MAGVIT-v2 visual codes, the SoundStream codes
   (level ``l``, code ``c`` at ``audio_offset + 1024·l + c``) and the reserved text entries. Text itself enters as
   projected T5 embeddings in reserved positions right after ``<bot_i>`` (§2.2).
2. :class:`Layout` and ``LAYOUTS`` — §2.5: every task's prefix and output written once, as data.
   :func:`build_sequences` turns a layout and the batch's parts into token rows, the prefix length, the loss and
   forcing masks and the text slots.
3. :class:`PrefixLM` — §2.6: decoder-only transformer (pre-RMSNorm, RoPE, SwiGLU), bidirectional attention inside
   the prefix and causal over the output (``nn.attention.prefix_lm_mask``), loss on output tokens only.
4. :class:`GroupSampler` — §2.7 alternating gradient descent: one task group (all sequences the same length) per
   step, drawn by weight, as a pure function of (seed, step) so resume is exact.
5. :class:`StructureCondition` — §2.5 stylisation: optical flow (2 channels) and depth (1 channel), each
   normalised, stacked as a 3-channel "video" and tokenised by the unchanged tokenizer.
6. :class:`VideoPoet` — the LightningModule: training from token shards, KV-cache sampling with temperature /
   top-k / top-p / CFG (negative prompt), I2V by forcing, task chaining and long-video extension (§2.9).
7. ``VIDEOPOET_SIZES`` — 300M / 1B / 8B (the dimensions are not published: marked [unverified]) and tiny.

Choices the paper leaves open (spec §2.5, §3), each made once, here:

- ``META_ORDER``: the ``<source>``, ``<res>`` and duration tokens sit after the inputs, right before the output
  (``<source>`` then ``<res>`` then duration) [unverified].
- Flattening: visual tokens raster per latent frame (t, then h, then w) [unverified]; audio level-major (paper).
- I2V: the 256 first-frame tokens are in the prefix *and* forced as the start of the output; the loss covers the
  remaining tokens [unverified].
- Frame prediction predicts the remaining latent frames (not the full clip) [unverified].
- Text dropout for CFG keeps ``<bot_i>`` ... ``<eot_i>`` and masks every text slot as a key (same length as the
  conditional sequence, so cond and uncond rows batch together) [unverified].
- AVCont: the first latent frame plus the first ``avcont_audio_frames`` audio frames in the prefix [unverified].
- Backbone: pre-RMSNorm, SwiGLU MLP, RoPE on every head dimension, untied output head [unverified; "UL2-style"].
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .nn.attention import KVCache, Mlp, MultiHeadAttention, prefix_lm_mask
from .nn.embeddings import RotaryEmbedding
from .nn.sampling import classifier_free_guidance, sample_logits
from .nn.optim import transformer_adamw
from .nn.batches import eval_rows
from .nn.step_logs import log_step
from .nn.seeding import step_generator, training_stream

__all__ = [
    "VideoPoetConfigError", "Vocabulary", "Layout", "LAYOUTS", "META_ORDER", "PackedSequences", "build_sequences",
    "PrefixLMConfig", "PrefixLMBlock", "PrefixLM", "GroupSampler", "padding_fraction", "StructureCondition",
    "VideoPoetConfig", "VideoPoet", "VIDEOPOET_SIZES",
]


class VideoPoetConfigError(ValueError):
    """A VideoPoet setting that cannot work; the message names the key and the fix."""


# ====================================================================================================================
# §2.3 / §2.4 Vocabulary
# ====================================================================================================================
#: special tokens of Table 4 plus the reserved placeholders; ids are their positions (all < 256)
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>",
    "<bot_i>", "<eot_i>", "<bov_i>", "<eov_i>", "<boa_i>", "<eoa_i>",
    "<bov_o>", "<eov_o>", "<boa_o>", "<eoa_o>",
    "<text>",                      # placeholder id of a text slot (its embedding is replaced by projected T5)
    "<mask>",                      # COMMIT: a condition token whose supervoxel holds no given pixel (§2.5 inpainting)
    "<res:128x224>",               # §2.4: only the portrait resolution has a token; 128x128 is assumed otherwise
    # one task token per distinct output type (§2.4: T2V, I2V and unconditional share one)
    "<task:image>", "<task:video>", "<task:fp>", "<task:paint>", "<task:style>", "<task:audio>", "<task:av>",
)
NUM_DURATION_TOKENS = 16           # "<dur:i>": the i-th entry of the config's `durations` (frames), e.g. 17, 41
NUM_SOURCE_TOKENS = 32             # "<source:i>": a data-source tag
NUM_SPECIAL = 256                  # ids [0, 256) are special and task tokens (§2.3)


class Vocabulary:
    """§2.3 unified vocabulary: specials ``[0, 256)``, visual codes at ``256 + c``, audio level ``l`` code ``c`` at
    ``audio_offset + audio_codes·l + c`` (level-disjoint), then ``text_vocab`` reserved text entries (unused)."""

    def __init__(self, visual_codes: int = 2 ** 18, audio_levels: int = 4, audio_codes: int = 1024,
                 text_vocab: int = 0):
        self.names = list(SPECIAL_TOKENS) + [f"<dur:{i}>" for i in range(NUM_DURATION_TOKENS)] + \
            [f"<source:{i}>" for i in range(NUM_SOURCE_TOKENS)]
        assert len(self.names) <= NUM_SPECIAL
        self.ids = {n: i for i, n in enumerate(self.names)}
        self.visual_codes, self.audio_levels, self.audio_codes = visual_codes, audio_levels, audio_codes
        self.visual_offset = NUM_SPECIAL
        self.audio_offset = self.visual_offset + visual_codes
        self.text_offset = self.audio_offset + audio_levels * audio_codes
        self.size = self.text_offset + text_vocab

    def special(self, name: str) -> int:
        if name not in self.ids:
            raise KeyError(f"unknown special token {name!r}; known: {self.names[:24]} ... <dur:i>, <source:i>")
        return self.ids[name]

    def visual(self, codes: Tensor) -> Tensor:
        """Visual codes ``[B, t, h, w]`` → vocabulary ids ``[B, t·h·w]`` (raster per latent frame)."""
        return rearrange(codes.long(), "b t h w -> b (t h w)") + self.visual_offset

    def audio(self, codes: Tensor) -> Tensor:
        """Audio codes ``[B, levels, frames]`` → ids ``[B, levels·frames]``, level-major with level offsets."""
        lv = torch.arange(codes.shape[1], device=codes.device)[None, :, None]
        return rearrange(codes.long() + self.audio_offset + self.audio_codes * lv, "b l f -> b (l f)")

    def range_of(self, modality: str) -> tuple[int, int]:
        """The id range ``[lo, hi)`` of ``visual`` or audio level ``audio:l``."""
        if modality == "visual":
            return self.visual_offset, self.audio_offset
        if modality.startswith("audio:"):
            lv = int(modality.split(":")[1])
            lo = self.audio_offset + self.audio_codes * lv
            return lo, lo + self.audio_codes
        raise ValueError(f"unknown modality {modality!r}")


# ====================================================================================================================
# §2.5 Sequence layouts, written once as data
# ====================================================================================================================
#: where the paper leaves the order open: source, resolution and duration tokens, after the inputs [unverified]
META_ORDER = ("source", "res", "duration")


@dataclass(frozen=True)
class Layout:
    """One task's token sequence (§2.5): prefix items (bidirectional, no loss), output items (causal, loss).

    Items: ``"<name>"`` a special token; ``"text"`` → ``<bot_i>`` + text slots + ``<eot_i>`` (dropped when the batch
    has no text and ``text`` is optional); ``"meta"`` → the ``META_ORDER`` tokens present; any other name is a data
    part (see :data:`PARTS`). ``forced`` output parts are given at sampling time and carry no loss.
    """

    name: str
    description: str
    task_token: str
    prefix: tuple[str, ...]
    output: tuple[str, ...]
    forced: tuple[str, ...] = ()
    text: str = "none"                 # "required" | "optional" | "none"
    kind: str = "video"                # data the task trains on: "image" (T = 1 tokens) or "video"
    commit_task: str | None = None     # MAGVIT task whose condition video gives the COMMIT tokens (paint)

    @property
    def needs(self) -> set[str]:
        return {p for p in self.prefix + self.output if not p.startswith("<") and p not in ("text", "meta")}


#: data parts: how each is cut from the batch's tokens and which vocabulary range it uses
#  visual parts slice the latent time axis of ``tokens [B, t, h, w]`` (c = condition latent frames)
PARTS: dict[str, tuple[str, str]] = {
    "image": ("visual", "first latent frame (a still image: T = 1 tokens)"),
    "video": ("visual", "all latent frames"),
    "first_frame": ("visual", "latent frame 0 (the causal tokenizer encodes frame 0 alone, 256 tokens at 128^2)"),
    "video_rest": ("visual", "latent frames 1..t-1"),
    "cond_frames": ("visual", "latent frames 0..c-1 (frame prediction condition)"),
    "future": ("visual", "latent frames c..t-1"),
    "commit": ("visual", "COMMIT tokens of the masked condition video, <mask> where no pixel is given"),
    "structure": ("visual", "tokens of the flow+depth stack (stylisation)"),
    "audio": ("audio", "all audio frames, level-major"),
    "audio_first": ("audio", "the first avcont_audio_frames audio frames, level-major"),
    "audio_rest": ("audio", "the remaining audio frames, level-major"),
}

_V_OUT = ("<bov_o>", "video", "<eov_o>", "<eos>")
LAYOUTS: dict[str, Layout] = {x.name: x for x in (
    Layout("t2i", "text-to-image: no <eov_o>/<eos> so generation can continue into a video (§2.5)", "<task:image>",
           ("<bos>", "<task:image>", "text"), ("<bov_o>", "image"), text="required", kind="image"),
    Layout("t2v", "text-to-video", "<task:video>", ("<bos>", "<task:video>", "text", "meta"), _V_OUT,
           text="required"),
    Layout("uncond", "unconditional video (shares the video task token)", "<task:video>",
           ("<bos>", "<task:video>", "meta"), _V_OUT),
    Layout("i2v", "image-to-video: first frame in the prefix and forced at the start of the output",
           "<task:video>", ("<bos>", "<task:video>", "text", "<bov_i>", "first_frame", "<eov_i>", "meta"),
           ("<bov_o>", "first_frame", "video_rest", "<eov_o>", "<eos>"), forced=("first_frame",), text="optional"),
    Layout("fp", "frame prediction / continuation: the first c latent frames given, the rest predicted",
           "<task:fp>", ("<bos>", "<task:fp>", "<bov_i>", "cond_frames", "<eov_i>", "meta"),
           ("<bov_o>", "future", "<eov_o>", "<eos>")),
    Layout("inpaint", "inpainting: COMMIT tokens of the centre-masked video (MAGVIT IPC)", "<task:paint>",
           ("<bos>", "<task:paint>", "<bov_i>", "commit", "<eov_i>"), _V_OUT, commit_task="IPC"),
    Layout("outpaint", "outpainting: COMMIT tokens of the centre-kept video (MAGVIT OPC)", "<task:paint>",
           ("<bos>", "<task:paint>", "<bov_i>", "commit", "<eov_i>"), _V_OUT, commit_task="OPC"),
    Layout("style", "stylisation: text + flow/depth structure tokens", "<task:style>",
           ("<bos>", "<task:style>", "text", "<bov_i>", "structure", "<eov_i>"), _V_OUT, text="required"),
    Layout("style_ff", "stylisation with the first frame (a subset of steps, §2.5)", "<task:style>",
           ("<bos>", "<task:style>", "text", "<bov_i>", "structure", "<eov_i>", "<bov_i>", "first_frame", "<eov_i>"),
           _V_OUT, text="required"),
    Layout("v2a", "video-to-audio", "<task:audio>", ("<bos>", "<task:audio>", "<bov_i>", "video", "<eov_i>"),
           ("<boa_o>", "audio", "<eoa_o>", "<eos>")),
    Layout("a2v", "audio-to-video (shares the video task token)", "<task:video>",
           ("<bos>", "<task:video>", "<boa_i>", "audio", "<eoa_i>"), _V_OUT),
    Layout("avcont", "audio-video continuation: first frame and its audio -> the rest of both", "<task:av>",
           ("<bos>", "<task:av>", "<bov_i>", "first_frame", "<eov_i>", "<boa_i>", "audio_first", "<eoa_i>"),
           ("<bov_o>", "video_rest", "<eov_o>", "<boa_o>", "audio_rest", "<eoa_o>", "<eos>")),
)}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise VideoPoetConfigError(f"unknown VideoPoet task {name!r}; allowed: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def cut_parts(layout: Layout, vocab: Vocabulary, tokens: Tensor | None = None, audio: Tensor | None = None,
              commit: Tensor | None = None, structure: Tensor | None = None, condition_latents: int = 1,
              avcont_audio_frames: int = 6) -> dict[str, tuple[Tensor, str]]:
    """The data parts ``layout`` needs, as vocabulary ids ``[B, n]`` with their modality.

    ``tokens``: visual codes ``[B, t, h, w]``; ``audio``: ``[B, levels, frames]``; ``commit``: codes with ``-1``
    where MAGVIT's COMMIT marks the position unknown (→ ``<mask>``); ``structure``: codes of the flow/depth stack.
    """
    out: dict[str, tuple[Tensor, str]] = {}
    c = condition_latents
    for name in layout.needs:
        src = {"commit": commit, "structure": structure}.get(name, tokens)
        if PARTS[name][0] == "visual":
            if src is None:
                raise ValueError(f"task {layout.name} needs {name!r}: {PARTS[name][1]}")
            t = src.shape[1]
            sl = {"image": slice(0, 1), "first_frame": slice(0, 1), "video_rest": slice(1, t),
                  "cond_frames": slice(0, c), "future": slice(c, t)}.get(name, slice(0, t))
            if name in ("cond_frames", "future") and not 0 < c < t:
                raise ValueError(f"frame prediction needs 0 < condition_latents={c} < latent frames {t}")
            part = src[:, sl]
            if name == "commit":
                ids = vocab.visual(part.clamp_min(0))
                ids = torch.where(rearrange(part, "b t h w -> b (t h w)") < 0, vocab.special("<mask>"), ids)
            else:
                ids = vocab.visual(part)
            out[name] = (ids, "visual")
        else:
            if audio is None:
                raise ValueError(f"task {layout.name} needs audio tokens [B, levels, frames] ({PARTS[name][1]})")
            f = audio.shape[-1]
            sl = {"audio_first": slice(0, avcont_audio_frames), "audio_rest": slice(avcont_audio_frames, f)}.get(
                name, slice(0, f))
            part = audio[..., sl]
            out[name] = (vocab.audio(part), f"audio@{part.shape[1]}x{part.shape[2]}")
    return out


@dataclass
class PackedSequences:
    """Token rows of one task group (every row the same length, §2.7) and where everything sits in them."""

    tokens: Tensor                       # long [B, N]
    prefix_len: int                      # positions [0, prefix_len) attend bidirectionally
    loss_mask: Tensor                    # bool [N]: target positions that carry the loss (output, not forced)
    forced: Tensor                       # bool [N]: positions whose token is given at sampling (specials, forced)
    modality: list[str]                  # per position: "special" | "visual" | "audio:l" | "text"
    key_valid: Tensor                    # bool [B, N]: False for unused text slots (and dropped text)
    text_span: tuple[int, int] | None    # [start, end) of the text slots
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def build_sequences(layout: Layout, vocab: Vocabulary, parts: Mapping[str, tuple[Tensor, str]], batch_size: int,
                    text_len: Tensor | None = None, max_text_tokens: int = 64, meta: Mapping[str, int] | None = None,
                    device: torch.device | str | None = None) -> PackedSequences:
    """Lay out ``parts`` (from :func:`cut_parts`) as ``layout`` says.

    ``text_len``: valid text tokens per row ``[B]`` (0 = dropped text: slots kept, masked as keys); ``None`` drops
    an optional text item (and is an error for a required one). ``meta``: special-token names per ``META_ORDER``
    key, e.g. ``{"duration": "<dur:0>", "res": "<res:128x224>"}`` (absent keys are left out).
    """
    cols: list[Tensor] = []
    kinds: list[str] = []
    loss: list[bool] = []
    forced: list[bool] = []
    spans: dict[str, tuple[int, int]] = {}
    text_span = None
    B = batch_size
    pos = 0

    def put(ids: Tensor, modality: str | list[str], has_loss: bool, is_forced: bool, name: str | None = None):
        nonlocal pos
        n = ids.shape[1]
        cols.append(ids)
        kinds.extend([modality] * n if isinstance(modality, str) else modality)
        loss.extend([has_loss] * n)
        forced.extend([is_forced] * n)
        if name is not None:
            spans[name] = (pos, pos + n)
        pos += n

    def special(name: str, is_output: bool):
        # output specials (<bov_o>, <eov_o>, <eos>, ...) carry the loss; sampling writes them (the layout fixes them)
        put(torch.full((B, 1), vocab.special(name), dtype=torch.long, device=device), "special", is_output, True)

    for section, items in (("prefix", layout.prefix), ("output", layout.output)):
        is_output = section == "output"
        if is_output:
            prefix_len = pos
        for item in items:
            if item.startswith("<"):
                special(item, is_output)
            elif item == "text":
                if text_len is None:
                    if layout.text == "required":
                        raise ValueError(f"task {layout.name} needs text (captions or cached text embeddings)")
                    continue
                special("<bot_i>", False)
                text_span = (pos, pos + max_text_tokens)
                put(torch.full((B, max_text_tokens), vocab.special("<text>"), dtype=torch.long, device=device),
                    "text", False, True, "text")
                special("<eot_i>", False)
            elif item == "meta":
                for key in META_ORDER:
                    if meta and meta.get(key):
                        special(meta[key], False)
            else:
                ids, mod = parts[item]
                if mod.startswith("audio@"):
                    lv, fr = (int(x) for x in mod[6:].split("x"))
                    mods = [f"audio:{i}" for i in range(lv) for _ in range(fr)]
                else:
                    mods = mod
                given = not is_output or item in layout.forced
                put(ids.to(device), mods, is_output and not given, given, item)
    tokens = torch.cat(cols, dim=1)
    key_valid = torch.ones(B, pos, dtype=torch.bool, device=tokens.device)
    if text_span is not None:
        s, e = text_span
        slot = torch.arange(e - s, device=tokens.device)
        key_valid[:, s:e] = slot[None] < text_len.to(tokens.device).clamp(max=e - s)[:, None]
    return PackedSequences(tokens, prefix_len, torch.tensor(loss, device=tokens.device),
                           torch.tensor(forced, device=tokens.device), kinds, key_valid, text_span, spans)


# ====================================================================================================================
# §2.6 Prefix LM
# ====================================================================================================================
@dataclass
class PrefixLMConfig:
    """Decoder-only prefix LM (§2.6; sizes in ``VIDEOPOET_SIZES``)."""

    vocab_size: int
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 8 / 3           # SwiGLU hidden = ratio·width (parameter-matched to a 4x GELU MLP)
    text_dim: int = 2048               # T5-XL encoder width
    rope_theta: float = 10000.0
    dropout: float = 0.0
    init_std: float = 0.02


class PrefixLMBlock(nn.Module):
    """Pre-norm block: ``x += Attn(RMSNorm(x))`` with RoPE and the prefix-LM mask; ``x += SwiGLU(RMSNorm(x))`` (§2.6)."""

    def __init__(self, cfg: PrefixLMConfig, rope: RotaryEmbedding):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.width, eps=1e-6)
        self.attn = MultiHeadAttention(cfg.width, cfg.heads, qkv_bias=False, rope=rope, proj_drop=cfg.dropout)
        self.norm2 = nn.RMSNorm(cfg.width, eps=1e-6)
        hidden = int(round(cfg.mlp_ratio * cfg.width / 8)) * 8
        self.mlp = Mlp(cfg.width, hidden, act="silu", gated=True, bias=False, drop=cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, positions: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        h = self.norm1(x)
        a = self.attn(h, mask=mask, positions=positions) if kv_cache is None else \
            self.attn(h, mask=mask, positions=positions, kv_cache=kv_cache)[0]
        x = x + a
        return x + self.mlp(self.norm2(x))


class PrefixLM(nn.Module):
    """Token embedding (+ projected text embeddings in the text slots, §2.2) → blocks → RMSNorm → vocabulary logits."""

    def __init__(self, cfg: PrefixLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.width)
        rope = RotaryEmbedding(cfg.width // cfg.heads, theta=cfg.rope_theta)
        self.blocks = nn.ModuleList([PrefixLMBlock(cfg, rope) for _ in range(cfg.depth)])
        self.norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases; residual output projections scaled by 1/sqrt(2·depth) (GPT-2)."""
        s = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=s)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:
            for lin in (b.attn.proj, b.mlp.fc2):
                nn.init.normal_(lin.weight, std=s / math.sqrt(2 * self.cfg.depth))

    def embed_tokens(self, tokens: Tensor, text: Tensor | None = None, text_start: int | None = None) -> Tensor:
        """Embeddings ``[B, n, width]``; ``text [B, L, text_dim]`` replaces positions ``text_start .. +L``."""
        x = self.embed(tokens)
        if text is not None and text_start is not None and text_start < tokens.shape[1]:
            L_ = min(text.shape[1], tokens.shape[1] - text_start)
            proj = self.text_proj(text[:, :L_].to(self.text_proj.weight.dtype)).to(x.dtype)
            x = torch.cat([x[:, :text_start], proj, x[:, text_start + L_:]], dim=1)
        return x

    def forward(self, tokens: Tensor, prefix_len: int | Tensor, key_valid: Tensor | None = None, text: Tensor | None = None,
                text_start: int | None = None, kv_caches: list[KVCache] | None = None, start: int = 0,
                logits_at: slice | Tensor | None = None) -> Tensor:
        """Logits ``[B, n, V]`` for ``tokens [B, n]`` at absolute positions ``start .. start+n``.

        ``prefix_len``: one int for the batch (a task group), or ``[B]`` per row (mixed, padded batches).
        ``key_valid [B, start+n]``: False for keys never attended (unused text slots). ``kv_caches`` (one per block)
        hold positions ``[0, start)``. ``logits_at``: positions (relative to ``tokens``) whose logits are needed.
        """
        B, n = tokens.shape
        total = start + n
        rel_text = None if text_start is None else text_start - start
        if rel_text is not None and rel_text < 0:
            text, rel_text = None, None  # the text slots are already in the cache
        x = self.embed_tokens(tokens, text, rel_text)
        mask = prefix_lm_mask(prefix_len, total, device=tokens.device, n_q=n)  # [n, total] or [B, 1, n, total]
        if mask.ndim == 2:
            mask = rearrange(mask, "i j -> 1 1 i j")
        if key_valid is not None:
            mask = mask & rearrange(key_valid[:, :total], "b j -> b 1 1 j")
        positions = torch.arange(start, total, device=tokens.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, positions, None if kv_caches is None else kv_caches[i])
        if logits_at is not None:
            x = x[:, logits_at]
        return self.head(self.norm(x))


# ====================================================================================================================
# §2.7 Alternating gradient descent over task groups
# ====================================================================================================================
def _one_per_batch(value: Any, key: str) -> int:
    """A per-batch value (a scalar, or ``[B]`` equal entries: one task group per step) as an int."""
    v = torch.as_tensor(value).flatten()
    if v.numel() == 0 or bool((v != v[0]).any()):
        raise ValueError(f"batch[{key!r}] must be one value per batch (a task group's rows share their special "
                         f"tokens), got {v.tolist()}")
    return int(v[0])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]))


class GroupSampler:
    """§2.7 AGD: step ``s`` trains on one group drawn by weight; a pure function of ``(seed, s)`` (exact resume)."""

    def __init__(self, weights: Mapping[str, float], seed: int = 0):
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise VideoPoetConfigError(f"group weights must be non-negative with a positive sum, got {dict(weights)}")
        self.names = list(weights)
        w = np.asarray([float(weights[k]) for k in self.names])
        self.cdf = np.cumsum(w / w.sum())
        self.seed = seed

    def group_at(self, step: int, salt: int = 0) -> str:
        u = _rng(self.seed, 0x56504F45, salt, step).random()
        return self.names[int(min(np.searchsorted(self.cdf, u, side="right"), len(self.names) - 1))]


def padding_fraction(lengths: Sequence[int]) -> float:
    """Fraction of a batch padded when sequences of ``lengths`` are padded to the longest (0 for one group)."""
    lengths = list(lengths)
    return 1.0 - sum(lengths) / (max(lengths) * len(lengths)) if lengths else 0.0


# ====================================================================================================================
# §2.5 Stylisation conditions
# ====================================================================================================================
FlowFn = Callable[[Tensor], Tensor]    # video [B, 3, T, H, W] in [-1, 1] -> flow [B, 2, T, H, W] in pixels/frame
DepthFn = Callable[[Tensor], Tensor]   # video [B, 3, T, H, W] in [-1, 1] -> depth (or disparity) [B, 1, T, H, W]


def load_depth_model(path: str) -> DepthFn:
    """A TorchScript depth network from a local file (e.g. MiDaS exported with ``torch.jit.script``), applied per
    frame to ``[N, 3, H, W]`` in [-1, 1]; returns ``[N, H, W]`` or ``[N, 1, H, W]``. Nothing is downloaded."""
    import os

    if not os.path.isfile(path):
        raise VideoPoetConfigError(f"depth_model {path!r} does not exist: export MiDaS (or any depth net) to "
                                   "TorchScript and give its local path")
    net = torch.jit.load(path, map_location="cpu").eval()

    @torch.no_grad()
    def depth(video: Tensor) -> Tensor:
        b = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        d = net(frames.to(next(iter(net.parameters())).device if list(net.parameters()) else frames.device))
        d = d.reshape(frames.shape[0], 1, *frames.shape[-2:]) if d.ndim == 3 else d
        return rearrange(d.float().to(video.device), "(b t) 1 h w -> b 1 t h w", b=b)

    return depth


class StructureCondition(nn.Module):
    """§2.5 / A.4: flow (2 ch) and depth (1 ch), each normalised to [-1, 1] per clip, stacked on channels → a
    3-channel "video" the unchanged tokenizer encodes.

    ``flow_fn``: the shared flow backend (OpenCV DIS from ``vidgen.lightning_modules.nn.trajectory`` once merged, or
    RAFT), or precomputed flow passed to :meth:`forward`; ``depth_fn``: :func:`load_depth_model` on a local MiDaS
    TorchScript, or precomputed depth. Flow is scaled by its per-clip max magnitude, depth min-max normalised.
    """

    def __init__(self, flow_fn: FlowFn | None = None, depth_fn: DepthFn | None = None):
        super().__init__()
        self.flow_fn, self.depth_fn = flow_fn, depth_fn

    @staticmethod
    def normalize_flow(flow: Tensor) -> Tensor:
        mag = flow.float().pow(2).sum(1, keepdim=True).sqrt().amax(dim=(1, 2, 3, 4), keepdim=True)
        return flow.float() / mag.clamp_min(1e-6)

    @staticmethod
    def normalize_depth(depth: Tensor) -> Tensor:
        lo = depth.float().amin(dim=(1, 2, 3, 4), keepdim=True)
        hi = depth.float().amax(dim=(1, 2, 3, 4), keepdim=True)
        return (depth.float() - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1

    def forward(self, video: Tensor | None = None, flow: Tensor | None = None, depth: Tensor | None = None) -> Tensor:
        if flow is None:
            if self.flow_fn is None or video is None:
                raise ValueError("stylisation needs optical flow: pass flow [B, 2, T, H, W] or build with flow_fn")
            flow = self.flow_fn(video)
        if depth is None:
            if self.depth_fn is None or video is None:
                raise ValueError("stylisation needs depth: pass depth [B, 1, T, H, W] or build with depth_fn "
                                 "(load_depth_model(path))")
            depth = self.depth_fn(video)
        if flow.shape[1] != 2 or depth.shape[1] != 1 or flow.shape[2:] != depth.shape[2:]:
            raise ValueError(f"flow must be [B, 2, T, H, W] and depth [B, 1, T, H, W]; got {tuple(flow.shape)}, "
                             f"{tuple(depth.shape)}")
        return torch.cat([self.normalize_flow(flow), self.normalize_depth(depth)], dim=1)


# ====================================================================================================================
# Config
# ====================================================================================================================
@dataclass
class VideoPoetConfig:
    """Every setting of :class:`VideoPoet` (the LightningModule's arguments are these fields)."""

    size: str = "300M"
    tasks: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "t2v": 1.0, "i2v": 1.0, "fp": 1.0})
    tokenizer_path: str | None = None
    visual_codes: int | None = None               # needed only without tokenizer_path (token batches, tests)
    init_from: str | None = None                  # task adaptation: start from these LM weights (EMA when present)
    audio_levels: int = 4
    audio_codes: int = 1024
    text_vocab: int = 0                           # reserved text entries after the audio codes (unused here)
    text_encoder: dict | None = None              # TextEncoderConfig mapping (T5-XL: kind hf, path: local dir)
    text_dim: int | None = None                   # width of cached embeddings when there is no text_encoder
    max_text_tokens: int = 64
    text_dropout: float = 0.1                     # CFG: fraction of rows trained without text
    condition_latents: int = 1                    # FP: latent frames given (long video: "the last second")
    avcont_audio_frames: int = 6
    durations: list[int] = field(default_factory=lambda: [17, 41])
    num_frames: int = 17                          # clip length for the duration token and long-video extension
    resolution: int = 128
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    dropout: float = 0.0
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    total_steps: int | None = None
    seed: int = 0
    # sampling (§2.9; not published: defaults [unverified])
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    use_kv_cache: bool = True
    sample_task: str | None = None
    num_samples: int = 4
    predict_task: str | None = None
    predict_prompts: list[str] | None = None
    extend_steps: int = 0                         # predict: long-video extension rounds after the first clip
    sample_fps: float = 8.0
    sr_stages: list[str] | None = None            # §2.8 cascade: VideoPoetSR checkpoints run on the sampled tokens
    # §2.2 audio: a SoundStream checkpoint (lightning_modules/soundstream.py) decodes v2a samples and encodes raw
    # batch["audio"]; audio_frames sizes the output of v2a sampling (2.125 s at 50 Hz: 106)
    audio_tokenizer_path: str | None = None
    audio_frames: int = 106

    def validate(self) -> None:
        """Raise :class:`VideoPoetConfigError` naming the key and the fix; reads no files."""
        import os

        if self.size not in VIDEOPOET_SIZES:
            raise VideoPoetConfigError(f"size must be one of {list(VIDEOPOET_SIZES)}, got {self.size!r}")
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise VideoPoetConfigError("tasks must map task names to weights, e.g. {t2v: 1.0, i2v: 1.0}; allowed "
                                       f"names: {', '.join(LAYOUTS)}")
        for name, w in self.tasks.items():
            get_layout(name)
            if not isinstance(w, (int, float)) or w < 0:
                raise VideoPoetConfigError(f"tasks.{name} weight must be a number >= 0, got {w!r}")
        for key in ("sample_task", "predict_task"):
            if getattr(self, key) is not None and getattr(self, key) not in LAYOUTS:
                raise VideoPoetConfigError(f"{key} {getattr(self, key)!r} is not a task; allowed: {', '.join(LAYOUTS)}")
        if self.tokenizer_path is None and self.visual_codes is None:
            raise VideoPoetConfigError("set tokenizer_path (a VideoTokenizer checkpoint) or visual_codes (the "
                                       "codebook size of the token shards) to train on token batches only")
        if self.audio_tokenizer_path is not None and not os.path.isfile(self.audio_tokenizer_path):
            raise VideoPoetConfigError(f"audio_tokenizer_path {self.audio_tokenizer_path!r} is not a file: train one "
                                       "(vidgen fit --config configs/videopoet/audio_tokenizer_tiny.yaml) or point at "
                                       "its checkpoint")
        if self.audio_frames < 1:
            raise VideoPoetConfigError(f"audio_frames must be >= 1 (2.125 s at 50 Hz: 106), got {self.audio_frames}")
        if self.tokenizer_path is not None and not os.path.exists(self.tokenizer_path):
            raise VideoPoetConfigError(f"tokenizer_path {self.tokenizer_path!r} does not exist: train one (vidgen fit "
                                       "--config configs/videopoet/tokenizer_lfq_tiny.yaml) or point at its checkpoint")
        if self.init_from is not None and not os.path.isfile(self.init_from):
            raise VideoPoetConfigError(f"init_from {self.init_from!r} is not a file: point it at the pretrained "
                                       "VideoPoet checkpoint (e.g. runs/videopoet/checkpoints/last.ckpt)")
        if self.text_encoder is None and self.text_dim is None:
            raise VideoPoetConfigError("set text_encoder (e.g. {kind: hf, path: /local/t5-v1_1-xl}) or text_dim (the "
                                       "width of the cached text embeddings in the token shards)")
        if not 1 <= self.max_text_tokens <= 512:
            raise VideoPoetConfigError(f"max_text_tokens must be in [1, 512] (paper: 64), got {self.max_text_tokens}")
        if not 0 <= self.text_dropout < 1:
            raise VideoPoetConfigError(f"text_dropout must be in [0, 1), got {self.text_dropout}")
        if self.condition_latents < 1:
            raise VideoPoetConfigError(f"condition_latents must be >= 1, got {self.condition_latents}")
        if len(self.durations) > NUM_DURATION_TOKENS:
            raise VideoPoetConfigError(f"durations lists {len(self.durations)} lengths; at most {NUM_DURATION_TOKENS}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise VideoPoetConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for path in self.sr_stages or []:
            if not os.path.isfile(path):
                raise VideoPoetConfigError(f"sr_stages entry {path!r} is not a file: train the stage (vidgen fit "
                                           "--config configs/videopoet/sr_stage1.yaml) and list its checkpoint")
        if self.sr_stages and self.extend_steps:
            raise VideoPoetConfigError("extend_steps re-tokenises the base-resolution clip; it cannot follow "
                                       "sr_stages: set one of them")
        if self.guidance_scale != 1.0 and self.text_dropout <= 0:
            raise VideoPoetConfigError("guidance_scale != 1 needs an unconditional branch: train with text_dropout > 0")

    def lm(self, vocab_size: int) -> PrefixLMConfig:
        depth, width, heads = VIDEOPOET_SIZES[self.size]
        return PrefixLMConfig(vocab_size=vocab_size, width=self.width or width, depth=self.depth or depth,
                              heads=self.heads or heads, text_dim=int(self.text_dim), dropout=self.dropout)


# ====================================================================================================================
# LightningModule
# ====================================================================================================================
def _hidden(module: nn.Module, name: str, value: Any) -> None:
    """Attach a frozen helper (tokenizer, text encoder) without registering it: never saved, never sharded."""
    module.__dict__[name] = value


class VideoPoet(L.LightningModule):
    """VideoPoet prefix LM (§2.6) trained with alternating gradient descent over task groups (§2.7).

    Batches (``VideoDataModule`` over ``vidgen tokenize`` shards): ``tokens`` [B, t, h, w] visual codes (t = 1:
    images), ``text`` captions (or cached ``text_emb`` [B, L, D] + ``text_len`` [B]), optionally ``audio_tokens``
    [B, levels, frames], ``commit_tokens`` / ``structure_tokens`` [B, t, h, w] (−1 = unknown), ``key``. A batch with
    ``video`` only is tokenised by the frozen tokenizer (for tasks that need pixels: paint, style).
    """

    fsdp_block_classes = (PrefixLMBlock,)

    def __init__(
        self,
        size: str = "300M",
        tasks: dict[str, float] | None = None,
        tokenizer_path: str | None = None,
        visual_codes: int | None = None,
        init_from: str | None = None,
        audio_levels: int = 4,
        audio_codes: int = 1024,
        text_vocab: int = 0,
        text_encoder: dict | None = None,
        text_dim: int | None = None,
        max_text_tokens: int = 64,
        text_dropout: float = 0.1,
        condition_latents: int = 1,
        avcont_audio_frames: int = 6,
        durations: list[int] | None = None,
        num_frames: int = 17,
        resolution: int = 128,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        dropout: float = 0.0,
        lr: float = 1e-3,
        betas: list[float] | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 1000,
        total_steps: int | None = None,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str | None = None,
        use_kv_cache: bool = True,
        sample_task: str | None = None,
        num_samples: int = 4,
        predict_task: str | None = None,
        predict_prompts: list[str] | None = None,
        extend_steps: int = 0,
        sample_fps: float = 8.0,
        sr_stages: list[str] | None = None,
        audio_tokenizer_path: str | None = None,
        audio_frames: int = 106,
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters()
        self.config = cfg = self.make_config(args)
        cfg.validate()
        _hidden(self, "tokenizer", None)
        _hidden(self, "text_model", None)
        _hidden(self, "audio_tokenizer", None)
        if cfg.tokenizer_path is not None:
            from .video_tokenizer import VideoTokenizer

            tok = VideoTokenizer.load_frozen(cfg.tokenizer_path)
            if tok.codebook_size is None:
                raise VideoPoetConfigError(f"{cfg.tokenizer_path} has a continuous bottleneck; VideoPoet needs tokens")
            if cfg.visual_codes not in (None, tok.codebook_size):
                raise VideoPoetConfigError(f"visual_codes={cfg.visual_codes} disagrees with the tokenizer "
                                           f"({tok.codebook_size}); drop it")
            cfg.visual_codes = tok.codebook_size
            self.attach_tokenizer(tok)
        if cfg.text_encoder is not None:
            from .nn.text_encoders import build_text_encoder

            _hidden(self, "text_model", build_text_encoder(cfg.text_encoder))
            if cfg.text_dim not in (None, self.text_model.token_dim):
                raise VideoPoetConfigError(f"text_dim={cfg.text_dim} disagrees with the text encoder "
                                           f"({self.text_model.token_dim}); drop it")
            cfg.text_dim = self.text_model.token_dim
        self.vocab = Vocabulary(int(cfg.visual_codes), cfg.audio_levels, cfg.audio_codes, cfg.text_vocab)
        self.net = PrefixLM(cfg.lm(self.vocab.size))
        if cfg.audio_tokenizer_path is not None:
            from .soundstream import SoundStream

            self.attach_audio_tokenizer(SoundStream.load_frozen(cfg.audio_tokenizer_path))
        self.init_report = self.load_lm_weights(cfg.init_from) if cfg.init_from else None

    # ---------------------------------------------------------------------------------------------------- config
    @staticmethod
    def make_config(args: Mapping[str, Any]) -> VideoPoetConfig:
        names = {f.name for f in fields(VideoPoetConfig)}
        a = {k: v for k, v in args.items() if k in names and v is not None}
        for k in ("durations", "betas", "predict_prompts", "sr_stages"):
            if k in a:
                a[k] = list(a[k])
        if "tasks" in a:
            a["tasks"] = dict(a["tasks"])
        return VideoPoetConfig(**a)

    @classmethod
    def validate_config(cls, init_args: Mapping[str, Any]) -> None:
        """Called by the CLI before anything is built."""
        sig = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(init_args) - sig
        if unknown:
            raise VideoPoetConfigError(f"unknown VideoPoet arguments {sorted(unknown)}; allowed: {sorted(sig)}")
        cls.make_config(init_args).validate()

    def load_lm_weights(self, path: str):
        """§2.7 task adaptation: the LM weights of a VideoPoet checkpoint (EMA when it has them), with a key report;
        the optimizer, schedule and step start fresh."""
        from .nn.checkpoint import KeyReport, read_state_dict

        sd = {k[len("net."):]: v for k, v in read_state_dict(path).items() if k.startswith("net.")}
        report = KeyReport.compare(sd, self.net.state_dict(), source=path, kind="VideoPoet LM", model="net")
        if not report.exact:
            raise VideoPoetConfigError(f"init_from {path!r} does not match this model (size / vocabulary):\n"
                                       f"{report.table()}")
        self.net.load_state_dict(sd)
        return report

    def attach_tokenizer(self, tokenizer: nn.Module) -> None:
        """Use ``tokenizer`` (frozen, eval) to encode conditions and decode samples; never saved in checkpoints."""
        tokenizer.eval()
        for p in tokenizer.parameters():
            p.requires_grad_(False)
        if hasattr(self, "vocab") and tokenizer.codebook_size != self.vocab.visual_codes:
            raise VideoPoetConfigError(f"tokenizer has {tokenizer.codebook_size} codes; the model was built for "
                                       f"{self.vocab.visual_codes}")
        _hidden(self, "tokenizer", tokenizer)

    def attach_text_encoder(self, encoder: nn.Module) -> None:
        """Use ``encoder`` (a frozen ``nn.text_encoders.TextEncoder``) for prompts; never saved in checkpoints."""
        if encoder.token_dim != self.net.cfg.text_dim:
            raise VideoPoetConfigError(f"text encoder width {encoder.token_dim} != the model's text_dim "
                                       f"{self.net.cfg.text_dim}")
        _hidden(self, "text_model", encoder)

    def attach_audio_tokenizer(self, codec: nn.Module) -> None:
        """Use ``codec`` (a frozen ``SoundStream``) to encode ``batch["audio"]`` and decode sampled audio tokens (§2.2);
        never saved in checkpoints. Its levels and codebook must match the vocabulary's audio slots."""
        c = codec.config
        if (c.levels, c.codebook_size) != (self.vocab.audio_levels, self.vocab.audio_codes):
            raise VideoPoetConfigError(f"the audio tokenizer has {c.levels} levels x {c.codebook_size} codes; the "
                                       f"vocabulary was built for audio_levels={self.vocab.audio_levels} x "
                                       f"audio_codes={self.vocab.audio_codes}: set those to match")
        codec.eval()
        for p in codec.parameters():
            p.requires_grad_(False)
        _hidden(self, "audio_tokenizer", codec)

    def audio_tokens_of(self, batch: Mapping[str, Any]) -> Tensor | None:
        """``batch["audio_tokens"]`` [B, levels, frames], else ``batch["audio"]`` [B, 1, S] encoded by the audio
        tokenizer, else None."""
        if batch.get("audio_tokens") is not None:
            return torch.as_tensor(batch["audio_tokens"])
        if batch.get("audio") is not None and self.audio_tokenizer is not None:
            return self.audio_tokenizer.to(self.device).encode(torch.as_tensor(batch["audio"]).to(self.device))
        return None

    def _tok(self) -> nn.Module:
        if self.tokenizer is None:
            raise RuntimeError("this VideoPoet has no tokenizer: set tokenizer_path or call attach_tokenizer()")
        return self.tokenizer.to(self.device)

    @property
    def causal_tokenizer(self) -> bool:
        arch = getattr(self.tokenizer, "arch", None)
        return bool(getattr(arch, "causal", False))

    # ---------------------------------------------------------------------------------------------------- inputs
    def encode_text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions → (embeddings ``[B, max_text_tokens, D]``, valid lengths ``[B]``) with the frozen encoder."""
        if self.text_model is None:
            raise RuntimeError("no text_encoder configured: give cached text_emb/text_len in the batch or set "
                               "text_encoder")
        enc = self.text_model.to(self.device)(list(texts))
        L_ = self.config.max_text_tokens
        emb, mask = enc.tokens[:, :L_], enc.mask[:, :L_]
        if emb.shape[1] < L_:
            emb = F.pad(emb, (0, 0, 0, L_ - emb.shape[1]))
            mask = F.pad(mask, (0, L_ - mask.shape[1]))
        return emb.float(), mask.sum(-1).long()

    def text_of(self, batch: Mapping[str, Any], n: int) -> tuple[Tensor | None, Tensor | None]:
        if batch.get("text_emb") is not None:
            emb = torch.as_tensor(batch["text_emb"]).to(self.device).float()[:, : self.config.max_text_tokens]
            ln = torch.as_tensor(batch.get("text_len", [emb.shape[1]] * emb.shape[0])).to(self.device).long()
            if emb.shape[1] < self.config.max_text_tokens:
                emb = F.pad(emb, (0, 0, 0, self.config.max_text_tokens - emb.shape[1]))
            return emb[:n], ln[:n].clamp(max=self.config.max_text_tokens)
        texts = batch.get("text")
        if texts is None or (self.text_model is None):
            return None, None
        return self.encode_text(list(texts)[:n])

    def meta_tokens(self, num_frames: int | None = None, portrait: bool = False, source: int | None = None) -> dict:
        """``META_ORDER`` tokens (§2.4): the duration token of ``num_frames`` (an entry of ``durations``; a clip
        length outside them is an error), ``<res>`` for a non-square clip and ``<source>``."""
        meta = {}
        if num_frames is not None and self.config.durations:
            if num_frames not in self.config.durations:
                raise ValueError(f"clips of {num_frames} frames, but model.durations is {list(self.config.durations)}: "
                                 "add the length to durations (one <dur:i> token each, §2.4) or train on clips of "
                                 "those lengths (data.num_frames)")
            meta["duration"] = f"<dur:{self.config.durations.index(num_frames)}>"
        if portrait:
            meta["res"] = "<res:128x224>"
        if source is not None:
            if not 0 <= int(source) < NUM_SOURCE_TOKENS:
                raise ValueError(f"batch['source'] = {int(source)}: a data-source tag must lie in [0, {NUM_SOURCE_TOKENS})")
            meta["source"] = f"<source:{int(source)}>"
        return meta

    def clip_frames(self, batch: Mapping[str, Any], tokens: Tensor | None) -> int | None:
        """Pixel frames of the batch's clips, for the duration token: ``batch["num_frames"]`` when the data gives it,
        else from the latent frames ``t`` of ``tokens`` through the attached tokenizer (causal: ``1 + f·(t − 1)``,
        otherwise ``f·t``). None for stills (``t = 1``) and for token batches without a tokenizer to say it."""
        given = batch.get("num_frames")
        if given is not None:
            return _one_per_batch(given, "num_frames")
        if tokens is None or tokens.shape[1] == 1:
            return None
        if self.tokenizer is None:
            if self.config.durations and not getattr(self, "_warned_duration", False):
                self._warned_duration = True
                warnings.warn(f"model.durations is {list(self.config.durations)} but the clip length of these token "
                              "batches is unknown (no tokenizer attached, no batch['num_frames']): their sequences "
                              "carry no duration token; set tokenizer_path, or durations: [] to train without one")
            return None
        t, f = int(tokens.shape[1]), int(self._tok().arch.temporal_factor)
        return 1 + f * (t - 1) if self.causal_tokenizer else f * t

    @torch.no_grad()
    def commit_tokens(self, video: Tensor, layout: Layout) -> Tensor:
        """MAGVIT COMMIT condition (§2.5 inpainting/outpainting): tokens of the padded condition video ``Ṽ`` with
        ``-1`` where the supervoxel holds no given pixel (from ``magvit.Task.condition_video`` and
        ``latent_condition_mask``)."""
        from .magvit import TASKS, latent_condition_mask

        tok = self._tok()
        cond_video, given = TASKS[layout.commit_task].condition_video(video.to(self.device), 1, -1.0)
        codes = tok.encode(cond_video)
        lat = latent_condition_mask(given, tuple(codes.shape[1:]), self.causal_tokenizer)
        return torch.where(lat[None], codes, -1)

    def sequences_for(self, layout: Layout, batch: Mapping[str, Any], tokens: Tensor | None,
                      text: tuple[Tensor | None, Tensor | None], n: int) -> PackedSequences:
        audio = self.audio_tokens_of(batch)
        commit = batch.get("commit_tokens")
        if commit is None and "commit" in layout.needs and batch.get("video") is not None:
            commit = self.commit_tokens(batch["video"][:n], layout)
        structure = batch.get("structure_tokens")
        if structure is None and "structure" in layout.needs and batch.get("structure") is not None:
            structure = self._tok().encode(batch["structure"][:n].to(self.device))
        parts = cut_parts(layout, self.vocab, tokens, None if audio is None else torch.as_tensor(audio)[:n].to(self.device),
                          None if commit is None else torch.as_tensor(commit)[:n].to(self.device),
                          None if structure is None else torch.as_tensor(structure)[:n].to(self.device),
                          self.config.condition_latents, self.config.avcont_audio_frames)
        text_len = text[1] if layout.text != "none" else None
        if "meta" in layout.prefix:
            source = batch.get("source")
            meta = self.meta_tokens(self.clip_frames(batch, tokens),
                                    portrait=tokens is not None and tokens.shape[2] != tokens.shape[3],
                                    source=None if source is None else _one_per_batch(source, "source"))
        else:
            meta = {}
        return build_sequences(layout, self.vocab, parts, n, text_len, self.config.max_text_tokens, meta, self.device)

    # ---------------------------------------------------------------------------------------------------- training
    def tasks_for(self, kind: str) -> dict[str, float]:
        return {k: w for k, w in self.config.tasks.items() if w > 0 and LAYOUTS[k].kind == kind}

    def task_at(self, step: int, kind: str, audio: bool = True) -> Layout:
        """§2.7: the task group of this step among those that train on this batch's data kind (seeded by step);
        a batch without audio tokens (``audio=False``, clips without a soundtrack) draws among the tasks that need
        none (§2.4: an absent modality drops out)."""
        cands = self.tasks_for(kind)
        if not audio and cands:
            cands = {k: w for k, w in cands.items()
                     if not any(PARTS[p][0] == "audio" for p in LAYOUTS[k].needs)}
            if not cands:
                raise ValueError(f"a batch without audio tokens arrived but every configured task needs audio "
                                 f"(tasks: {dict(self.config.tasks)}); tokenise with --audio-checkpoint "
                                 "--audio-required (drops clips without a soundtrack) or add a video-only task")
        if not cands:
            raise ValueError(f"a batch of {kind} tokens arrived but no configured task trains on {kind}s "
                             f"(tasks: {dict(self.config.tasks)}); add one (e.g. t2i for images) or drop the source")
        return LAYOUTS[GroupSampler(cands, self.config.seed).group_at(step, salt=0 if kind == "image" else 1)]

    def lm_loss(self, seq: PackedSequences, text_emb: Tensor | None) -> tuple[Tensor, Tensor]:
        """Cross-entropy on the output tokens only (§2.6): logits at ``p − 1`` predict token ``p`` for every
        position ``p`` of the output that is not forced. Returns (loss, token accuracy)."""
        P = seq.prefix_len
        kept = seq.loss_mask[P:].nonzero().squeeze(1)  # output positions with a loss (the head runs on these alone)
        logits = self.net(seq.tokens, P, seq.key_valid, text_emb, None if seq.text_span is None else seq.text_span[0],
                          logits_at=P - 1 + kept)
        target = seq.tokens[:, P + kept]
        loss = F.cross_entropy(rearrange(logits.float(), "b n v -> (b n) v"), rearrange(target, "b n -> (b n)"))
        acc = (logits.detach().argmax(-1) == target).float().mean()
        return loss, acc

    def _text_drop(self, text_len: Tensor | None, step: int, stream: int = 0) -> Tensor | None:
        if text_len is None or not self.training or self.config.text_dropout <= 0:
            return text_len
        g = step_generator(self.config.seed, step, stream)
        drop = (torch.rand(text_len.shape[0], generator=g) < self.config.text_dropout).to(text_len.device)
        return torch.where(drop, 0, text_len)

    def tokens_of(self, batch: Mapping[str, Any]) -> Tensor:
        if batch.get("tokens") is not None:
            z = torch.as_tensor(batch["tokens"]).to(self.device).long()
            if z.ndim == 3:  # a still written as [h, w] per sample
                z = z[:, None]
            if z.ndim != 4:
                raise ValueError(f"batch['tokens'] must be [B, t, h, w] visual codes, got {tuple(z.shape)}")
            if int(z.min()) < 0 or int(z.max()) >= self.vocab.visual_codes:
                raise ValueError(f"visual codes must lie in [0, {self.vocab.visual_codes}): re-tokenise with the "
                                 "tokenizer this model was built for")
            return z
        if batch.get("video") is None:
            raise ValueError("a VideoPoet batch needs 'tokens' [B, t, h, w] (vidgen tokenize) or 'video'")
        return self._tok().encode(batch["video"].to(self.device)).long()

    def step_loss(self, batch: Mapping[str, Any], step: int, layout: Layout | None = None,
                  stream: int = 0) -> dict[str, Tensor]:
        """Loss of one batch: the task group of ``step`` (every rank the same), text dropped for CFG by the draws of
        ``(seed, step, stream)`` (``nn.seeding``: each rank and micro-batch its own stream)."""
        tokens = self.tokens_of(batch)
        n = tokens.shape[0]
        layout = layout or self.task_at(step, "image" if tokens.shape[1] == 1 else "video",
                                        audio=self.audio_tokens_of(batch) is not None)
        emb, ln = self.text_of(batch, n) if layout.text != "none" else (None, None)
        ln = self._text_drop(ln, step, stream)
        seq = self.sequences_for(layout, batch, tokens, (emb, ln), n)
        loss, acc = self.lm_loss(seq, emb)
        text_pad = 0.0
        if seq.text_span is not None:
            text_pad = float((~seq.key_valid).float().mean())
        return {"loss": loss, "acc": acc, "length": torch.tensor(float(seq.length)), "task": layout.name,
                "text_pad_fraction": torch.tensor(text_pad), "padding_fraction": torch.tensor(0.0)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.step_loss(batch, self.global_step, stream=training_stream(self, batch_idx))
        n = len(batch["tokens"]) if batch.get("tokens") is not None else len(batch["video"])
        log_step(self, {"train/loss": out["loss"], f"train/loss_{out['task']}": out["loss"], "train/acc": out["acc"],
                        "train/seq_len": out["length"],
                        "train/padding_fraction": out["padding_fraction"],   # one group per step: 0
                        "train/text_slot_pad_fraction": out["text_pad_fraction"]}, n)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch, n = eval_rows(batch)  # DDP padding dropped (all padding: one row logged with weight 0)
        tokens = self.tokens_of(batch)
        kind = "image" if tokens.shape[1] == 1 else "video"
        total = 0.0
        names = list(self.tasks_for(kind))
        for name in names:
            out = self.step_loss(batch, batch_idx, LAYOUTS[name])
            self.log(f"val/loss_{name}", out["loss"], sync_dist=True, batch_size=n)
            total = total + out["loss"]
        loss = total / max(1, len(names))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        """AdamW; weight decay on Linear weights only; linear warmup then cosine to 0 [unverified: not published]."""
        c = self.config
        return transformer_adamw(self, self.net, c.lr, c.betas, c.weight_decay, c.warmup_steps, c.total_steps)

    # ---------------------------------------------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample_sequences(self, seq: PackedSequences, text_emb: Tensor | None = None, uncond: PackedSequences | None = None,
                         uncond_text: Tensor | None = None, generator: torch.Generator | None = None,
                         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                         guidance_scale: float | None = None, use_kv_cache: bool | None = None) -> Tensor:
        """Fill the non-forced output positions of ``seq`` left to right (§2.9) → tokens ``[B, N]``.

        Each position samples only from its modality's id range (the layout fixes it); forced positions (specials,
        I2V's first frame) keep ``seq``'s token. ``uncond`` (same layout, text dropped or the negative prompt) turns
        on classifier-free guidance ``l_u + s·(l_c − l_u)``. With ``use_kv_cache`` each step feeds one token.
        """
        c = self.config
        temperature = c.temperature if temperature is None else temperature
        top_k = c.top_k if top_k is None else top_k
        top_p = c.top_p if top_p is None else top_p
        scale = c.guidance_scale if guidance_scale is None else guidance_scale
        use_kv_cache = c.use_kv_cache if use_kv_cache is None else use_kv_cache
        was_training = self.net.training
        self.net.eval()
        B, P, N = seq.tokens.shape[0], seq.prefix_len, seq.length
        cfg_on = uncond is not None and scale != 1.0
        toks = torch.cat([seq.tokens, uncond.tokens]) if cfg_on else seq.tokens.clone()
        valid = torch.cat([seq.key_valid, uncond.key_valid]) if cfg_on else seq.key_valid
        text = text_emb
        if cfg_on and text_emb is not None:
            text = torch.cat([text_emb, uncond_text if uncond_text is not None else torch.zeros_like(text_emb)])
        t0 = None if seq.text_span is None else seq.text_span[0]
        caches = [KVCache() for _ in self.net.blocks] if use_kv_cache else None
        try:
            logits = self.net(toks[:, :P], P, valid, text, t0, caches, 0, logits_at=slice(P - 1, P))
            for p in range(P, N):
                if not bool(seq.forced[p]):
                    lo, hi = self.vocab.range_of(seq.modality[p])
                    lg = logits[:, -1, lo:hi].float()
                    if cfg_on:
                        lg = classifier_free_guidance(lg[:B], lg[B:], scale)
                    new = sample_logits(lg, temperature, top_k, top_p, generator) + lo
                    toks[:, p] = torch.cat([new, new]) if cfg_on else new
                if p == N - 1:
                    break
                if use_kv_cache:
                    logits = self.net(toks[:, p:p + 1], P, valid, None, None, caches, p)
                else:
                    logits = self.net(toks[:, :p + 1], P, valid, text, t0, logits_at=slice(p, p + 1))
        finally:
            self.net.train(was_training)
        return toks[:B]

    def _template(self, layout: Layout, n: int, token_shape: Sequence[int], given: Tensor | None) -> Tensor:
        """Visual code grid ``[n, t, h, w]``: zeros (placeholders for what is sampled) with the given latent frames."""
        grid = torch.zeros(n, *token_shape, dtype=torch.long, device=self.device)
        if given is not None:
            k = given.shape[1]
            grid[:, :k] = given[:n].to(self.device).long()
        return grid

    @torch.inference_mode()
    def sample(self, task: str, n: int, token_shape: Sequence[int], texts: Sequence[str] | None = None,
               given_tokens: Tensor | None = None, batch: Mapping[str, Any] | None = None,
               generator: torch.Generator | None = None, **overrides) -> dict[str, Tensor]:
        """Sample ``n`` sequences of ``task`` → ``{"tokens": visual codes [n, t, h, w], "audio": [n, L, F]?}``.

        ``token_shape``: the output clip's latent grid (t = 1 for t2i). ``given_tokens``: the condition latent frames
        (I2V: the first frame, FP: ``condition_latents`` frames), written into the template and the prefix.
        ``overrides``: temperature, top_k, top_p, guidance_scale, use_kv_cache.
        """
        layout = get_layout(task)
        c = self.config
        batch = dict(batch or {})
        if texts is not None:
            batch["text"] = list(texts)[:n]
        grid = self._template(layout, n, token_shape, given_tokens)
        if any(PARTS.get(p, ("",))[0] == "audio" for p in layout.output) and self.audio_tokens_of(batch) is None:
            # placeholders for the sampled audio (v2a / avcont output): audio_frames frames per level
            batch["audio_tokens"] = torch.zeros(n, c.audio_levels, c.audio_frames, dtype=torch.long,
                                                device=self.device)
        emb, ln = self.text_of(batch, n) if layout.text != "none" else (None, None)
        if layout.text == "required" and emb is None:
            raise ValueError(f"task {task} needs prompts (texts=...) or cached text embeddings")
        seq = self.sequences_for(layout, batch, grid, (emb, ln), n)
        uncond, uemb = None, None
        scale = overrides.get("guidance_scale", c.guidance_scale)
        if emb is not None and scale != 1.0:
            if c.negative_prompt:
                uemb, uln = self.encode_text([c.negative_prompt] * n)
            else:
                uemb, uln = torch.zeros_like(emb), torch.zeros_like(ln)
            uncond = self.sequences_for(layout, batch, grid, (uemb, uln), n)
        toks = self.sample_sequences(seq, emb, uncond, uemb, generator, **overrides)
        out: dict[str, Tensor] = {}
        t = grid.shape[1]
        for name, (s, e) in seq.spans.items():
            if name not in layout.output or PARTS.get(name, ("",))[0] != "visual":
                continue
            codes = toks[:, s:e] - self.vocab.visual_offset
            sl = {"image": (0, 1), "first_frame": (0, 1), "video_rest": (1, t), "future": (c.condition_latents, t),
                  "video": (0, t)}[name]
            grid[:, sl[0]:sl[1]] = rearrange(codes, "b (t h w) -> b t h w", t=sl[1] - sl[0], h=grid.shape[2])
        out["tokens"] = grid
        audio_spans = [(nm, se) for nm, se in seq.spans.items() if nm in layout.output and PARTS.get(nm, ("",))[0] == "audio"]
        if audio_spans:
            pieces = []
            for nm, (s, e) in audio_spans:
                ids = toks[:, s:e]
                lv = self.config.audio_levels
                codes = rearrange(ids, "b (l f) -> b l f", l=lv)
                pieces.append(codes - self.vocab.audio_offset - self.vocab.audio_codes * torch.arange(lv, device=ids.device)[None, :, None])
            out["audio"] = torch.cat(pieces, dim=-1)
        out["sequence"] = toks
        return out

    # ---------------------------------------------------------------------------------------------------- pixels
    def token_grid(self, num_frames: int | None = None) -> tuple[int, int, int]:
        c = self.config
        return tuple(self._tok().token_shape(num_frames or c.num_frames, c.resolution, c.resolution))

    def condition_pixels(self, layout: Layout) -> int:
        """Pixel frames behind the condition latent frames (I2V: 1 for a causal tokenizer; FP: condition_latents)."""
        k = 1 if layout.name in ("i2v", "avcont", "style_ff") else self.config.condition_latents
        tf = self._tok().arch.temporal_factor
        return 1 + tf * (k - 1) if self.causal_tokenizer else k * tf

    @torch.no_grad()
    def encode_condition(self, frames: Tensor, latents: int) -> Tensor:
        """Re-tokenise condition frames ``[B, C, k, H, W]`` → their first ``latents`` latent frames. The frames are
        edge-padded to the clip length (MAGVIT's FP padding) so a non-causal tokenizer accepts them; for the causal
        MAGVIT-v2 tokenizer the result equals encoding the frames alone."""
        T = self.config.num_frames
        k = frames.shape[2]
        idx = torch.arange(T, device=frames.device).clamp(max=k - 1)
        return self._tok().encode(frames[:, :, idx].to(self.device))[:, :latents]

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None, task: str | None = None) -> Tensor:
        """Videos ``[B, C, T, H, W]`` in [−1, 1] for ``task`` (default ``sample_task``, else t2v/uncond): prompts from
        ``batch['text']``; I2V / FP conditions from ``batch['video']`` (or ``batch['tokens']``)."""
        c = self.config
        batch = dict(batch or {})
        name = task or batch.get("task") or c.sample_task or ("t2v" if "t2v" in c.tasks else next(iter(c.tasks)))
        layout = get_layout(name if isinstance(name, str) else name[0])
        n = num_samples or next((len(batch[k]) for k in ("text", "video", "tokens", "text_emb", "audio_tokens", "audio")
                                 if batch.get(k) is not None and len(batch[k])), c.num_samples)
        if layout.name == "v2a":  # the pictures are the input's; their sound is generate_audio()
            return (batch["video"][:n].float() if batch.get("video") is not None else
                    self._tok().decode(self.tokens_of(batch)[:n]).float().clamp(-1, 1))
        if layout.text == "required" and not batch.get("text") and batch.get("text_emb") is None:
            batch["text"] = (list(c.predict_prompts or []) or [""]) * n
            batch["text"] = batch["text"][:n]
        grid = self.token_grid(1 if layout.kind == "image" else None)
        given = None
        if layout.name in ("i2v", "fp"):
            k_lat = 1 if layout.name == "i2v" else c.condition_latents
            if batch.get("tokens") is not None:
                given = torch.as_tensor(batch["tokens"])[:n, :k_lat].to(self.device)
            elif batch.get("video") is not None:
                k = self.condition_pixels(layout)
                given = self.encode_condition(batch["video"][:n, :, :k], k_lat)
            else:
                raise ValueError(f"task {layout.name} needs batch['video'] or batch['tokens'] for its condition")
        out = self.sample(layout.name, n, grid, batch=batch, given_tokens=given, generator=generator)
        return self._tok().decode(self.super_resolve(out["tokens"], batch, generator)).float().clamp(-1, 1)

    def super_resolve(self, tokens: Tensor, batch: Mapping[str, Any] | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """§2.8 cascade: the ``sr_stages`` (``VideoPoetSR`` checkpoints, loaded once) upsample the sampled codes 2x
        each, in token space, before the one detokenisation; no stages: the codes unchanged."""
        if not self.config.sr_stages:
            return tokens
        if getattr(self, "_sr_cascade", None) is None:
            from .videopoet_sr import VideoPoetSR

            _hidden(self, "_sr_cascade", [VideoPoetSR.load_frozen(p) for p in self.config.sr_stages])
        for path, stage in zip(self.config.sr_stages, self._sr_cascade):
            if stage.config.visual_codes != self.vocab.visual_codes or tuple(tokens.shape[1:]) != stage.lr_grid:
                raise VideoPoetConfigError(f"sr stage {path} upsamples {stage.lr_grid} tokens of a "
                                           f"{stage.config.visual_codes}-code tokenizer; it was given "
                                           f"{tuple(tokens.shape[1:])} tokens of {self.vocab.visual_codes} codes")
            tokens = stage.to(self.device).super_resolve(tokens, batch, generator)
        return tokens

    @torch.no_grad()
    def generate_audio(self, batch: Mapping[str, Any], num_samples: int | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """§2.5 video-to-audio: sample the audio tokens (level-major) of the clips in ``batch`` (``tokens`` or
        ``video``) → (waveforms ``[B, 1, frames·hop]`` decoded by the audio tokenizer, codes ``[B, levels, frames]``)."""
        if self.audio_tokenizer is None:
            raise RuntimeError("v2a decodes audio tokens: set audio_tokenizer_path or call attach_audio_tokenizer()")
        batch = {k: v for k, v in batch.items() if k not in ("audio", "audio_tokens")}
        tokens = self.tokens_of(batch)
        n = num_samples or tokens.shape[0]
        out = self.sample("v2a", n, tuple(tokens.shape[1:]), given_tokens=tokens[:n], batch=batch, generator=generator)
        codes = out["audio"]
        return self.audio_tokenizer.to(self.device).decode(codes), codes

    @torch.no_grad()
    def extend_video(self, video: Tensor, steps: int, generator: torch.Generator | None = None) -> Tensor:
        """§2.9 long video: repeatedly re-tokenise the last frames (``condition_latents`` latent frames, "the last
        second"), predict the next latent frames with the FP task, decode and append the new frames."""
        c = self.config
        layout = LAYOUTS["fp"]
        k = self.condition_pixels(layout)
        grid = self.token_grid()
        frames = video.to(self.device).float()
        for _ in range(steps):
            cond = self.encode_condition(frames[:, :, -k:], c.condition_latents)
            out = self.sample("fp", frames.shape[0], grid, given_tokens=cond, generator=generator)
            clip = self._tok().decode(out["tokens"]).float().clamp(-1, 1)
            frames = torch.cat([frames, clip[:, :, k:]], dim=2)
        return frames

    # ---------------------------------------------------------------------------------------------------- predict
    def predict_dataloader(self):
        c = self.config
        prompts = list(c.predict_prompts or [""] * c.num_samples)
        return [{"text": prompts, "key": [f"sample{i:03d}" for i in range(len(prompts))]}]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """The prediction dict contract: ``videos`` [B, C, T, H, W] in [−1, 1], ``keys``, ``captions`` and, for I2V /
        FP, ``cond_videos``; with ``extend_steps`` the clips are extended (§2.9). Writes no files."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed + batch_idx * 100003 + self.global_rank)
        name = c.predict_task or c.sample_task or ("t2v" if "t2v" in c.tasks else next(iter(c.tasks)))
        if name == "v2a":  # the input clips with their generated soundtracks (muxed by the PredictionWriter)
            audio, _ = self.generate_audio(batch, generator=g)
            videos = batch["video"].float() if batch.get("video") is not None else \
                self._tok().decode(self.tokens_of(batch)).float().clamp(-1, 1)
            n = videos.shape[0]
            keys = list(batch.get("key") or [f"{batch_idx:05d}_{i:03d}" for i in range(n)])[:n]
            return {"videos": videos, "keys": keys, "audio": audio.float().cpu(),
                    "sample_rate": self.audio_tokenizer.sample_rate, "task": name}
        videos = self.generate(batch, generator=g, task=name)
        if c.extend_steps:
            videos = self.extend_video(videos, c.extend_steps, g)
        n = videos.shape[0]
        keys = list(batch.get("key") or [f"{batch_idx:05d}_{i:03d}" for i in range(n)])[:n]
        out = {"videos": videos, "keys": keys, "captions": list(batch.get("text") or [""] * n)[:n]}
        if name in ("i2v", "fp") and batch.get("video") is not None:
            out["cond_videos"] = batch["video"][:n]
        if name == "a2v" and self.audio_tokenizer is not None:  # the conditioning soundtrack goes with the video
            audio = batch.get("audio")
            audio = torch.as_tensor(audio)[:n] if audio is not None else \
                self.audio_tokenizer.to(self.device).decode(self.audio_tokens_of(batch)[:n].to(self.device))
            out.update(audio=audio.float().cpu(), sample_rate=self.audio_tokenizer.sample_rate)
        return out


# ====================================================================================================================
# Size table (§2.6): depth, width, heads. The paper gives only the parameter counts: every dimension is [unverified]
# ====================================================================================================================
VIDEOPOET_SIZES: dict[str, tuple[int, int, int]] = {
    "300M": (24, 1024, 16),     # [unverified] ~300M non-embedding (12·d²·L with the SwiGLU at 8/3)
    "1B": (24, 2048, 16),       # [unverified] ~1.2B
    "8B": (32, 4096, 32),       # [unverified] spec suggestion (PaLM-2/T5-style d_model 4096, 32 layers, 32 heads)
    "tiny": (2, 64, 4),         # laptop CPU / tests / demo
}

