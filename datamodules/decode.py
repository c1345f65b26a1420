"""Sample decoding: clip sampling, decoding from memory (``media.FrameReader``: decord, PyAV fallback),
resize/crop/flip, metadata.

Runs inside DataLoader workers.  Never ``torchvision.io``, never ``wds.torch_video``, never unpickling: shard
members are parsed as video/image bytes, UTF-8 text and JSON only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from .media import AUDIO_EXTS, FrameReader, MediaError, printable, read_audio, read_image
from .motion import clip_motion, has_motion
from .tario import IMAGE_EXTS, READ_ERROR, VIDEO_EXTS

SHORT_POLICIES = ("loop", "pad", "skip")
AUDIO_POLICIES = ("silence", "skip")
CROPS = ("center", "random")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How to turn one sample into a clip tensor."""

    num_frames: int = 16
    frame_stride: int = 1
    fps: float | None = None  # target fps; overrides frame_stride when the source fps is known
    height: int = 128
    width: int = 128
    crop: str = "center"  # train crop; eval is always center
    flip: bool = False  # random horizontal flip (train only)
    short_policy: str = "loop"  # videos shorter than the clip: loop | pad (repeat last frame) | skip
    image_frames: str = "single"  # images: single (T=1) | repeat (T=num_frames)
    require_text: bool = False
    require_label: bool = False  # class-conditional training: a sample without a label is skipped and counted
    backend: str = "auto"  # auto | decord | pyav
    motion: bool = False  # Tora: require traj.npy (vidgen trajectories); see datamodules/motion.py
    # per-clip target fps drawn from lo + (hi - lo) * Beta(a, b) (train; eval takes the Beta mean). Make-A-Video §3.4
    fps_range: tuple[float, float] | None = None
    fps_beta: tuple[float, float] = (1.0, 1.0)
    # audio aligned with the clip (VideoPoet §2.2): None = no audio; else the rate it is resampled to
    audio_rate: int | None = None
    audio_channels: int = 1  # 1: mean of the channels (mono); 2: stereo (a mono track is duplicated)
    audio_policy: str = "silence"  # no audio track: silence + has_audio False | skip (counted as no_audio)


def target_fps(spec: ClipSpec, rng: np.random.Generator | None) -> float | None:
    """The clip's target fps: a Beta draw in ``spec.fps_range`` (its mean in eval), else ``spec.fps``."""
    if spec.fps_range is None:
        return spec.fps
    lo, hi = spec.fps_range
    a, b = spec.fps_beta
    u = rng.beta(a, b) if rng is not None else a / (a + b)
    return float(lo + (hi - lo) * u)


def sample_kind(sample: dict[str, bytes]) -> tuple[str, str] | None:
    """('video'|'image', ext) of the media member of a raw sample, or None."""
    for ext in VIDEO_EXTS:
        if ext in sample:
            return "video", ext
    for ext in IMAGE_EXTS:
        if ext in sample:
            return "image", ext
    return None


def clip_indices(n: int, num_frames: int, step: float, offset_u: float | None, policy: str) -> np.ndarray:
    """Frame indices of a clip of ``num_frames`` taken every ``step`` source frames.

    ``offset_u`` in [0,1) picks the start uniformly among valid starts (train); None takes the middle clip (eval)."""
    span = (num_frames - 1) * step + 1
    if n >= span:
        max_start = n - span
        start = int(math.floor(offset_u * (max_start + 1))) if offset_u is not None else max_start // 2
        start = min(start, int(max_start))
        idx = np.floor(start + np.arange(num_frames) * step + 1e-6).astype(np.int64)
        return np.minimum(idx, n - 1)
    if policy == "skip":
        raise SkipSample("too_short", f"{n} frames < clip span {span:.0f}")
    idx = np.floor(np.arange(num_frames) * step + 1e-6).astype(np.int64)
    if policy == "loop":
        return idx % n
    return np.minimum(idx, n - 1)  # pad: repeat the last frame


def read_video(data: bytes, spec: ClipSpec, offset_u: float | None, meta_fps: float | None):
    """-> (uint8 frames [T,H,W,C], source fps, step); decoding is ``media.FrameReader`` (decord, PyAV fallback)."""
    frames, fps, step, _ = read_clip(data, spec, offset_u, meta_fps)
    return frames, fps, step


def read_clip(data: bytes, spec: ClipSpec, offset_u: float | None, meta_fps: float | None):
    """``read_video`` plus the clip's source frame indices (the audio window starts at ``idx[0] / fps``)."""
    try:
        reader = FrameReader(data, backend=spec.backend)
    except MediaError as e:
        raise SkipSample("corrupt", str(e)) from e
    fps = reader.fps or (meta_fps or 0.0)
    step = _step(spec, fps)
    idx = clip_indices(reader.num_frames, spec.num_frames, step, offset_u, spec.short_policy)
    uniq, inv = np.unique(idx, return_inverse=True)
    try:
        frames = reader.get(uniq.tolist())
    except MediaError as e:
        raise SkipSample("corrupt", str(e)) from e
    return frames[inv], fps, step, idx


def audio_window(spec: ClipSpec, idx: np.ndarray | None, src_fps: float, step: float) -> tuple[float, float]:
    """(start, duration) in seconds of the audio that goes with a clip of source frames ``idx``.

    The clip shows frames ``idx[0], idx[0] + step, ...``; frame ``i`` covers ``[i / fps, (i + 1) / fps)``, so the
    clip spans ``num_frames * step / fps`` seconds from ``idx[0] / fps`` (= ``num_frames / spec.fps`` with a target
    fps). A clip that loops or pads a short video keeps the window from 0 (silence past the track's end)."""
    if src_fps <= 0:
        raise SkipSample("no_audio", "the video has no frame rate, so its clip has no time span")
    start = float(idx[0]) / src_fps if idx is not None and len(idx) else 0.0
    return start, spec.num_frames * step / src_fps


def audio_length(spec: ClipSpec, src_fps: float, step: float) -> int:
    return int(round(spec.num_frames * step / src_fps * spec.audio_rate)) if src_fps > 0 else \
        int(round(spec.num_frames / (spec.fps or 1.0) * spec.audio_rate))


def clip_audio(sample: dict[str, bytes], video: bytes | None, spec: ClipSpec, start: float, duration: float) -> dict:
    """``{"audio": float32 [channels, S], "has_audio": bool}`` for the window; a separate audio member
    (``{key}.m4a``/``.wav``/...: video2dataset) wins over the video's own track. No track: ``audio_policy``."""
    ext = next((e for e in AUDIO_EXTS if e in sample), None)
    src = sample[ext] if ext is not None else video
    n = int(round(duration * spec.audio_rate))
    got = None
    if src is not None:
        try:
            got = read_audio(src, start, duration, spec.audio_rate, mono=spec.audio_channels == 1)
        except MediaError as e:
            if ext is not None:  # a broken audio member is a broken sample; a video's broken track counts as none
                raise SkipSample("corrupt", f"{ext}: {e}") from e
    if got is None:
        if spec.audio_policy == "skip":
            raise SkipSample("no_audio", "no audio track or audio member (data.audio_policy: skip)")
        return {"audio": torch.zeros(spec.audio_channels, n), "has_audio": False}
    x = got[0]
    if x.shape[0] != spec.audio_channels:
        x = np.repeat(x[:1], spec.audio_channels, axis=0)
    return {"audio": torch.from_numpy(np.ascontiguousarray(x[:, :n])), "has_audio": True}


def _step(spec: ClipSpec, src_fps: float) -> float:
    if spec.fps and src_fps > 0:
        return max(src_fps / spec.fps, 1e-3)
    return float(spec.frame_stride)


def resize_crop(frames: np.ndarray, height: int, width: int, crop: str, u: tuple[float, float] | None) -> torch.Tensor:
    """uint8 [T,H,W,C] -> uint8 [C,T,height,width]: crop the largest region of the target aspect, then resize.

    Cropping first resizes only the pixels that are kept (the same result as resize-then-crop up to the filter's
    border). ``u`` gives the random crop position in [0,1)^2 (None: center)."""
    t, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    ch, cw = min(h, round(height / scale)), min(w, round(width / scale))
    if crop == "random" and u is not None:
        y0, x0 = int(u[0] * (h - ch + 1)), int(u[1] * (w - cw + 1))
    else:
        y0, x0 = (h - ch) // 2, (w - cw) // 2
    kept = np.ascontiguousarray(frames[:, y0 : y0 + ch, x0 : x0 + cw])
    x = torch.from_numpy(kept if kept.flags.writeable else kept.copy())  # decoders may hand read-only buffers
    x = rearrange(x, "t h w c -> t c h w")
    if (ch, cw) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return rearrange(x, "t c h w -> c t h w")


def parse_meta(sample: dict[str, bytes]) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from e
    return meta if isinstance(meta, dict) else {}


def parse_text(sample: dict[str, bytes], meta: dict) -> str | None:
    for ext in ("txt", "caption", "text"):
        if ext in sample:
            try:
                return sample[ext].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise SkipSample("bad_text", str(e)) from e
    for k in ("caption", "text", "txt"):
        if isinstance(meta.get(k), str):
            return meta[k].strip()
    return None


def parse_label(sample: dict[str, bytes], meta: dict) -> int:
    if "cls" in sample:
        try:
            return int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as e:
            raise SkipSample("bad_label", str(e)) from e
    for k in ("label", "cls", "class"):
        if isinstance(meta.get(k), (int, float)) and not isinstance(meta.get(k), bool):
            return int(meta[k])
    return -1


def decode_sample(key: str, sample: dict[str, bytes], spec: ClipSpec, rng: np.random.Generator | None) -> dict:
    """Raw members -> {video uint8 [C,T,H,W], text, label, fps, key}. ``rng`` None means eval (deterministic)."""
    if READ_ERROR in sample:  # a file list's row whose file could not be read (removed or unreadable since setup)
        raise SkipSample("unreadable", sample[READ_ERROR].decode("utf-8", "replace"))
    kind = sample_kind(sample)
    if kind is None and "npy" not in sample:
        raise SkipSample("no_media", f"members {sorted(sample)} hold no video, image or .npy tokens/latents")
    meta = parse_meta(sample)
    text = parse_text(sample, meta)
    if text is None:
        if spec.require_text:
            raise SkipSample("missing_text", "no caption (txt member or json 'caption')")
        text = ""
    label = parse_label(sample, meta)
    if label < 0 and spec.require_label:
        raise SkipSample("missing_label", "no label (.cls member or json 'label') for a class-conditional model")
    if kind is None:  # a token/latent shard written by `vidgen tokenize`
        return {**read_array(sample["npy"]), **read_extras(sample, meta), "text": text, "label": label, "key": key,
                "fps": float(meta.get("fps") or 0.0) if isinstance(meta.get("fps"), (int, float)) else 0.0}
    u = rng.random(4) if rng is not None else None
    if spec.fps_range is not None and kind[0] == "video":
        spec = dataclasses.replace(spec, fps=target_fps(spec, rng))  # drawn after u: other draws are unchanged
    if spec.motion and "traj.npy" not in sample:
        raise SkipSample("no_motion", "no traj.npy member (run `vidgen trajectories` on these shards)")
    step = 1.0
    media = sample[kind[1]]
    try:
        if kind[0] == "video":
            meta_fps = float(meta["fps"]) if isinstance(meta.get("fps"), (int, float)) else None
            frames, src_fps, step, idx = read_clip(media, spec, None if u is None else float(u[0]), meta_fps)
            fps = src_fps / step if src_fps > 0 else float(spec.fps or 0.0)
            if spec.audio_rate:
                start, dur = audio_window(spec, idx, src_fps, step)
                sound = clip_audio(sample, media, spec, start, dur)
        else:
            frames = read_image(media)[None]
            fps = 0.0
    except SkipSample:
        raise
    except Exception as e:  # decoder errors: corrupt, truncated, unsupported
        raise SkipSample("corrupt", f"{type(e).__name__}: {printable(str(e))}") from e
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] < 2 or frames.shape[2] < 2:
        raise SkipSample("corrupt", f"decoded array has shape {frames.shape}")
    crop = spec.crop if rng is not None else "center"
    video = resize_crop(frames, spec.height, spec.width, crop, None if u is None else (float(u[1]), float(u[2])))
    flipped = rng is not None and spec.flip and u[3] < 0.5
    if flipped:
        video = video.flip(-1)
    if kind[0] == "image" and spec.image_frames == "repeat":
        video = video.expand(-1, spec.num_frames, -1, -1).contiguous()
    out = {"video": video, "text": text, "label": label, "fps": fps, "key": key, "kind": kind[0]}
    if spec.audio_rate:  # stills have no sound: the policy decides (a constant length for image + video batches)
        if kind[0] == "image":
            if spec.audio_policy == "skip":
                raise SkipSample("no_audio", "a still image has no audio (data.audio_policy: skip)")
            sound = {"audio": torch.zeros(spec.audio_channels, audio_length(spec, 0.0, 1.0)), "has_audio": False}
        out.update(sound)
    if kind[0] == "video" and has_motion(sample):  # Tora's trajectories / flow follow the clip (motion.py)
        out.update(clip_motion(sample, meta, spec, u, step, spec.height, spec.width, flipped))
    return out


def read_array(data: bytes) -> dict:
    """``.npy`` bytes -> ``{"tokens": int64}`` (integer arrays) or ``{"latents": float32}``; never unpickles."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SkipSample("corrupt", f"npy: {e}") from e
    if np.issubdtype(arr.dtype, np.integer):
        return {"tokens": torch.from_numpy(arr.astype(np.int64)), "kind": "tokens"}
    if np.issubdtype(arr.dtype, np.floating):
        return {"latents": torch.from_numpy(arr.astype(np.float32)), "kind": "latents"}
    raise SkipSample("corrupt", f"npy of dtype {arr.dtype} is neither tokens nor latents")


#: optional members of a token shard sample (``vidgen tokenize --text-encoder``; audio tokens from an audio
#: tokenizer): member extension -> batch key. ``text.npy`` is float [max_text_tokens, D] zero-padded, its valid
#: length in the json's ``text_len``; ``audio.npy`` is int [levels, frames] (VideoPoet §2.2).
EXTRA_ARRAYS = {"text.npy": "text_emb", "audio.npy": "audio_tokens"}


def read_extras(sample: dict[str, bytes], meta: dict) -> dict:
    """The optional arrays of a token shard sample (``EXTRA_ARRAYS``) plus ``text_len``; never unpickles."""
    out = {}
    for ext, name in EXTRA_ARRAYS.items():
        if ext not in sample:
            continue
        try:
            arr = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SkipSample("corrupt", f"{ext}: {e}") from e
        dtype = np.float32 if name == "text_emb" else np.int64
        out[name] = torch.from_numpy(arr.astype(dtype))
    if "text_emb" in out:
        n = meta.get("text_len")
        out["text_len"] = int(n) if isinstance(n, int) else int(out["text_emb"].shape[0])
    return out


ARRAY_KEYS = ("video", "tokens", "latents")
STACKED_EXTRAS = ("text_emb", "audio_tokens", "text_len", "audio", "has_audio")


def main_tensor(sample: dict) -> torch.Tensor:
    return next(sample[k] for k in ARRAY_KEYS if k in sample)


def sample_shape(sample: dict) -> tuple[int, ...]:
    """The shape a batch bucket groups by: the main tensor's, plus the audio length when there is audio (without a
    target fps, sources of different frame rates give clips of different durations)."""
    shape = tuple(main_tensor(sample).shape)
    return shape + (int(sample["audio"].shape[-1]),) if "audio" in sample else shape


def to_float(video_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float32 [-1,1] (one conversion pass, then in place)."""
    out = torch.empty(video_u8.shape, dtype=torch.float32, device=video_u8.device)
    return out.copy_(video_u8).mul_(1 / 127.5).sub_(1.0)
