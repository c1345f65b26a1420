"""Video/image I/O, written once below models, callbacks and tools: probe/read videos (decord, PyAV fallback),
encode mp4 in memory (PyAV), write videos and PNG/mp4 grids from tensors or arrays.

Readers: ``FrameReader`` is the one decoder of video files and byte strings; the datamodule's clip decoder
(``datamodules/decode.py``), the shard writer (``vidgen shards``) and the prediction writer all go through it.

Layouts accepted by the writers: ``[T, H, W, C]`` (frames, channels last) or ``[C, T, H, W]`` (the batch
contract's per-sample layout); batches are ``[B, C, T, H, W]``.  Float inputs are mapped from ``value_range``
(default ``(-1, 1)``, the batch contract) to uint8; uint8 inputs are written as they are.

Nothing here imports torch at module import time; tensors are converted with ``.detach().cpu().numpy()``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
import threading
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")

BACKENDS = ("auto", "decord", "pyav")  # decoders: auto = decord when installed, PyAV where decord fails

_ENCODER_CACHE: dict[str, str | None] = {}


class MediaError(ValueError):
    """A file or byte string that cannot be decoded as video/image."""


# ----------------------------------------------------------------------------------------------------------- arrays
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def to_uint8(x: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Float in ``value_range`` (clipped) or uint8 -> uint8 array of the same shape."""
    a = _to_numpy(x)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    lo, hi = value_range
    a = (a.astype(np.float32) - lo) / float(hi - lo)
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


def to_thwc_uint8(video: Any, value_range: tuple[float, float] = (-1.0, 1.0), layout: str | None = None) -> np.ndarray:
    """One video as ``[T, H, W, 3]`` uint8 from ``[T, H, W, C]`` or ``[C, T, H, W]`` (C in 1, 3, 4).

    ``layout`` ("thwc" / "cthw") removes the guess for shapes where both readings are possible."""
    a = _to_numpy(video)
    if a.ndim == 3:  # a single image [H, W, C] or [C, H, W]
        last = _guess_channels_last(a.shape, {"hwc": "thwc", "chw": "cthw"}.get(layout or "", layout))
        a, layout = (a[None], "thwc") if last else (a[:, None], "cthw")
    if a.ndim != 4:
        raise MediaError(f"expected a video [T,H,W,C] or [C,T,H,W], got shape {tuple(a.shape)}")
    if layout is None:
        layout = "thwc" if _guess_channels_last(a.shape, None) else "cthw"
    if layout == "cthw":
        a = np.moveaxis(a, 0, -1)
    elif layout != "thwc":
        raise MediaError(f"layout must be 'thwc' or 'cthw', got {layout!r}")
    if a.shape[-1] not in (1, 3, 4):
        raise MediaError(f"video has {a.shape[-1]} channels after layout {layout!r}; expected 1, 3 or 4 (shape {a.shape})")
    a = to_uint8(a, value_range)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def _guess_channels_last(shape: tuple, layout) -> bool:
    """Channels-last unless only the first axis looks like channels; [3, ..., 3]-like shapes read as channels-first
    (the batch contract's [C, T, H, W])."""
    if layout:
        return layout == "thwc"
    first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
    if first and last:
        return shape[0] != 3 and shape[-1] == 3
    return last


def make_video_grid(
    videos: Any,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: int = 255,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """``[B, C, T, H, W]`` (or a list of ``[C, T, H, W]``) -> ``[T, H', W', 3]`` uint8, B tiles per frame.

    ``nrow`` is the number of tiles per row (default: ceil(sqrt(B))).  Videos shorter than the longest hold their
    last frame."""
    vids = [to_thwc_uint8(v, value_range, layout="cthw") for v in _as_batch(videos)]
    b = len(vids)
    t = max(v.shape[0] for v in vids)
    h = max(v.shape[1] for v in vids)
    w = max(v.shape[2] for v in vids)
    ncol = nrow or int(math.ceil(math.sqrt(b)))
    nrows = int(math.ceil(b / ncol))
    grid = np.full((t, nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), pad_value, np.uint8)
    for i, v in enumerate(vids):
        r, c = divmod(i, ncol)
        if v.shape[0] < t:
            v = np.concatenate([v, np.repeat(v[-1:], t - v.shape[0], axis=0)], axis=0)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, y : y + v.shape[1], x : x + v.shape[2]] = v
    return grid


def _as_batch(videos: Any) -> list:
    if isinstance(videos, (list, tuple)):
        return list(videos)
    a = videos
    shape = tuple(a.shape)
    if len(shape) == 4:  # a single [C, T, H, W]
        return [a]
    if len(shape) != 5:
        raise MediaError(f"expected videos [B, C, T, H, W], got shape {shape}")
    return [a[i] for i in range(shape[0])]


# ---------------------------------------------------------------------------------------------------------- encoding
def best_encoder(container_ext: str = "mp4") -> str:
    """The encoder used for mp4: libx264 when the installed PyAV has it, else mpeg4 (webm: libvpx)."""
    key = container_ext
    if key not in _ENCODER_CACHE:
        import av

        prefs = ("libvpx-vp9", "libvpx") if container_ext == "webm" else ("libx264", "h264", "mpeg4")
        found = None
        for name in prefs:
            try:
                av.codec.Codec(name, "w")
                found = name
                break
            except Exception:
                continue
        if found is None:
            raise MediaError("the installed PyAV has no usable video encoder (tried libx264, mpeg4)")
        _ENCODER_CACHE[key] = found
    return _ENCODER_CACHE[key]  # type: ignore[return-value]


def _fps_fraction(fps: float) -> Fraction:
    fps = float(fps)
    if not (fps > 0 and math.isfinite(fps)):
        raise MediaError(f"fps must be a positive number, got {fps}")
    for den in (1, 1001, 2, 4, 100):  # common exact rates: 25, 30000/1001, 12.5 ...
        f = Fraction(round(fps * den), den)
        if abs(float(f) - fps) < 1e-6 * max(1.0, fps):
            return f
    return Fraction(fps).limit_denominator(100000)


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: replicate the last row/column when H or W is odd."""
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def encode_video(
    frames: Any,
    fps: float,
    container: str = "mp4",
    codec: str | None = None,
    crf: int = 18,
    preset: str = "veryfast",
    threads: int = 1,
    value_range: tuple[float, float] = (-1.0, 1.0),
    layout: str | None = None,
    audio: Any = None,
    sample_rate: int | None = None,
) -> bytes:
    """Encode a video (see module doc for layouts) into an in-memory container; returns its bytes.

    mp4 uses libx264 (yuv420p, ``crf``, ``preset``) when available, else mpeg4 at a high bitrate.  Odd sizes are
    padded by one replicated row/column.  With ``threads=1`` (and x264's mb-tree off) the same frames give the same
    bytes.  ``audio`` (float ``[C, S]`` or ``[S]`` in [-1, 1] at ``sample_rate``; more than 2 channels are mixed to
    mono) is muxed as a soundtrack starting with the first frame (AAC; Opus for webm); the video stream's packets are the same with or without it."""
    import av

    arr = _even(to_thwc_uint8(frames, value_range, layout))
    if arr.shape[0] == 0:
        raise MediaError("cannot encode a video with 0 frames")
    codec = codec or best_encoder(container)
    buf = io.BytesIO()
    fmt = {"mp4": "mp4", "m4v": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "avi": "avi"}.get(container, container)
    rate = _fps_fraction(fps)
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = int(arr.shape[2]), int(arr.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1) / rate
        stream.codec_context.thread_count = max(1, int(threads))
        if codec in ("libx264", "h264"):
            # x264's macroblock-tree rate control gives run-to-run different bytes for the same frames (seen with
            # threads=1 too); without it the output is reproducible, at a small cost in size.
            stream.options = {"crf": str(int(crf)), "preset": preset, "x264-params": "mbtree=0"}
        elif codec == "mpeg4":
            stream.bit_rate = int(max(2e5, arr.shape[1] * arr.shape[2] * float(rate) * 1.0))
            stream.options = {"qscale": "2"}
        elif codec.startswith("libvpx"):
            stream.options = {"crf": str(int(crf)), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        sound = None if audio is None else _add_audio_stream(out, audio, sample_rate, "libopus" if fmt == "webm" else "aac")
        for i, f in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            _mux_audio(out, *sound)
    return buf.getvalue()


def _add_audio_stream(out, audio: Any, sample_rate: int | None, codec: str) -> tuple:
    """Add the soundtrack's stream to an output container before anything is muxed; returns what ``_mux_audio``
    needs."""

    if not sample_rate or int(sample_rate) <= 0:
        raise MediaError("audio needs a positive sample_rate")
    a = _to_numpy(audio).astype(np.float32)
    a = a.reshape(1, -1) if a.ndim == 1 else a
    if a.ndim != 2:
        raise MediaError(f"audio must be [S] or [C, S], got shape {tuple(a.shape)}")
    if a.shape[0] > 2:  # surround (e.g. 5.1): written as the mono mean
        a = a.mean(0, keepdims=True)
    a = np.ascontiguousarray(np.clip(a, -1.0, 1.0))
    rate = int(sample_rate)
    layout = "mono" if a.shape[0] == 1 else "stereo"
    st = out.add_stream(codec, rate=48000 if codec == "libopus" else rate)
    st.layout = layout
    st.format = "fltp" if codec == "aac" else "flt"
    st.bit_rate = 64000 * a.shape[0]
    if codec == "aac":
        st.options = {"aac_coder": "fast"}  # 2x faster than the default two-loop search, at these rates as clean
    return st, a, rate, layout


def _mux_audio(out, st, a: np.ndarray, rate: int, layout: str) -> None:
    """Encode float audio ``[C, S]`` into the stream (frames of the codec's size, pts in samples)."""
    import av

    if st.codec_context.sample_rate != rate:  # Opus runs at 48 kHz
        a = resample_audio(a, rate, st.codec_context.sample_rate)
        rate = st.codec_context.sample_rate
    size = 960 if st.codec_context.name == "libopus" else 1024
    for i in range(0, a.shape[1], size):
        chunk = a[:, i:i + size]
        if st.format.name == "flt":
            frame = av.AudioFrame.from_ndarray(chunk.T.reshape(1, -1).copy(), format="flt", layout=layout)
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = i
        for packet in st.encode(frame):
            out.mux(packet)
    for packet in st.encode():
        out.mux(packet)


def write_video(
    path: str | os.PathLike,
    video: Any,
    fps: float = 8.0,
    value_range: tuple[float, float] = (-1.0, 1.0),
    layout: str | None = None,
    crf: int = 18,
    audio: Any = None,
    sample_rate: int | None = None,
) -> str:
    """Write one video (``[T,H,W,C]`` or ``[C,T,H,W]``, uint8 or float in ``value_range``) to ``path``.

    The container follows the extension: .mp4/.mov/.mkv/.webm/.avi via PyAV, .gif via Pillow.  Atomic (temp file,
    then rename).  Returns the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "mp4"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == "gif":
        from PIL import Image

        arr = to_thwc_uint8(video, value_range, layout)
        ims = [Image.fromarray(f) for f in arr]
        bio = io.BytesIO()
        ims[0].save(bio, format="GIF", save_all=True, append_images=ims[1:], duration=int(round(1000 / fps)), loop=0)
        data = bio.getvalue()
    else:
        data = encode_video(video, fps, container=ext, value_range=value_range, layout=layout, crf=crf, audio=audio,
                            sample_rate=sample_rate)
    atomic_write(path, data)
    return path


def save_video_grid_mp4(
    path: str | os.PathLike,
    videos: Any,
    fps: float = 8.0,
    nrow: int | None = None,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> str:
    """Tile a batch ``[B, C, T, H, W]`` (in ``value_range``) into one video and write it (mp4 or gif by extension)."""
    grid = make_video_grid(videos, nrow=nrow, padding=padding, value_range=value_range)
    return write_video(path, grid, fps=fps, layout="thwc")


def write_grid_png(
    path: str | os.PathLike,
    videos: Any,
    max_frames: int | None = 8,
    padding: int = 2,
    pad_value: int = 255,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> str:
    """A PNG with one row per video of ``[B, C, T, H, W]`` and up to ``max_frames`` evenly spaced frames per row
    (None: all frames).  Images (T=1) give a single column.  Returns the path."""
    from PIL import Image

    vids = [to_thwc_uint8(v, value_range, layout="cthw") for v in _as_batch(videos)]
    t = max(v.shape[0] for v in vids)
    n = t if max_frames is None else max(1, min(t, int(max_frames)))
    h = max(v.shape[1] for v in vids)
    w = max(v.shape[2] for v in vids)
    img = np.full((len(vids) * (h + padding) + padding, n * (w + padding) + padding, 3), pad_value, np.uint8)
    for r, v in enumerate(vids):
        idx = np.linspace(0, v.shape[0] - 1, n).round().astype(int) if v.shape[0] > 1 else np.zeros(1, int)
        for c, fi in enumerate(idx):
            y, x = padding + r * (h + padding), padding + c * (w + padding)
            img[y : y + v.shape[1], x : x + v.shape[2]] = v[fi]
    bio = io.BytesIO()
    Image.fromarray(img).save(bio, format="PNG")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, bio.getvalue())
    return path


def atomic_write(path: str, data: bytes) -> None:
    d, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{base}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------- decoding
_STDERR_LOCK = threading.Lock()
_CAPTURE: dict = {}  # pid -> temporary file (one per process; DataLoader workers are forked)


@contextlib.contextmanager
def quiet_stderr(captured: list):
    """Route file descriptor 2 to a temporary file while native decoder code runs.

    decord prints its errors from C++ and names the in-memory "file" it was given, i.e. the raw video bytes, straight
    onto the terminal. What it wrote is appended to ``captured`` (callers put a printable summary into the error,
    which the datamodule's skip counters and logs keep)."""
    with _STDERR_LOCK:
        tmp = _CAPTURE.get(os.getpid())
        try:
            if tmp is None:
                tmp = _CAPTURE[os.getpid()] = tempfile.TemporaryFile()
            saved = os.dup(2)
        except OSError:  # no stderr or no temporary directory: decode without the guard
            yield
            return
        try:
            tmp.seek(0)
            tmp.truncate()
            os.dup2(tmp.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read(4096))


def printable(raw: bytes | str, limit: int = 120) -> str:
    """Decoder output reduced to one printable line (binary runs become ``?``)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = re.sub(r"[^\x20-\x7e]+", "?", text.replace("\n", " | ")).strip(" |?")
    return text[:limit] + ("..." if len(text) > limit else "")


def _decord_said(e: Exception, captured: list) -> str:
    """One printable line for a decord failure: its exception plus FFmpeg's reason (never the raw bytes)."""
    said = b"".join(captured)
    if b"ERROR opening: " in said:  # "ERROR opening: <the video bytes>, <FFmpeg's reason>": keep the reason
        tail = [x for x in said.split(b"ERROR opening: ", 1)[1].split(b"\n") if x.strip()]
        said = b"cannot open: " + (tail[-1].rsplit(b", ", 1)[-1] if tail else b"")
    said = printable(said)
    return f"decord: {printable(str(e))}" + (f" ({said})" if said else "")


def _source(src: str | os.PathLike | bytes) -> Any:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    return os.fspath(src)


def _decord():
    try:
        import decord  # noqa: F401

        return decord
    except Exception:  # no wheel for this platform
        return None


def probe_video(src: str | os.PathLike | bytes) -> dict:
    """``{"fps", "num_frames", "width", "height", "duration"}`` of a video file or byte string.

    decord first, PyAV as fallback; raises MediaError when neither can read a frame."""
    errors = []
    decord = _decord()
    if decord is not None:
        captured: list[bytes] = []
        try:
            with quiet_stderr(captured):
                vr = decord.VideoReader(_source(src), num_threads=1)
                n = len(vr)
                if n <= 0:
                    raise MediaError("0 frames")
                fps = float(vr.get_avg_fps())
                h, w = vr[0].shape[:2]  # decode one frame: catches files with a header but broken payload
            return _meta(fps, n, w, h)
        except Exception as e:
            errors.append(_decord_said(e, captured))
    try:
        import av

        with av.open(_source(src)) as c:
            vs = c.streams.video[0]
            fps = float(vs.average_rate or vs.guessed_rate or 0) or 0.0
            n = 0
            w = h = 0
            for fr in c.decode(vs):
                if n == 0:
                    w, h = fr.width, fr.height
                n += 1
            if n == 0:
                raise MediaError("0 frames")
            return _meta(fps, n, w, h)
    except Exception as e:
        errors.append(f"pyav: {printable(str(e))}")
    raise MediaError("cannot read video (" + "; ".join(errors) + ")")


def _meta(fps: float, n: int, w: int, h: int) -> dict:
    fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else 0.0
    return {
        "fps": fps,
        "num_frames": int(n),
        "width": int(w),
        "height": int(h),
        "duration": float(n / fps) if fps > 0 else 0.0,
    }


class FrameReader:
    """Random access to the frames of one video, optionally resized to ``width`` x ``height`` (-1: source size).

    Frames are decoded by decord (PyAV when decord cannot open the source, or mis-decodes it).  With
    ``fast_resize`` (default) decord resizes while decoding (libswscale, antialiased, fast on big sources); where that
    fails for a size, and with ``fast_resize=False``, frames are decoded at the source size and resized with Pillow
    (bicubic).  ``fps``, ``num_frames``; ``get(indices) -> [T, H, W, 3] uint8``."""

    def __init__(self, src: str | os.PathLike | bytes, width: int = -1, height: int = -1, fast_resize: bool = True,
                 backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._src, self.width, self.height = src, int(width), int(height)
        self._fast = bool(fast_resize) and self.width > 0 and self.height > 0
        self._vr = None
        self._strict = backend == "decord"  # no PyAV fallback
        self._frames: np.ndarray | None = None  # PyAV fallback: every frame, decoded once
        errors = []
        decord = _decord() if backend != "pyav" else None
        if backend == "decord" and decord is None:
            raise MediaError("backend 'decord' asked for, but decord is not installed")
        if decord is not None:
            captured: list[bytes] = []
            try:
                size = dict(width=self.width, height=self.height) if self._fast else {}
                with quiet_stderr(captured):
                    self._vr = decord.VideoReader(_source(src), num_threads=1, **size)
                self.num_frames = len(self._vr)
                self.fps = float(self._vr.get_avg_fps())
                if self.num_frames <= 0:
                    raise MediaError("0 frames")
                return
            except Exception as e:
                self._vr = None
                errors.append(_decord_said(e, captured))
                if self._strict:
                    raise MediaError("cannot decode video (" + "; ".join(errors) + ")") from None
        try:
            self._frames, self.fps = self._decode_all_pyav()
            self.num_frames = len(self._frames)
        except Exception as e:
            errors.append(f"pyav: {printable(str(e))}")
            raise MediaError("cannot decode video (" + "; ".join(errors) + ")") from None

    def _decode_all_pyav(self) -> tuple[np.ndarray, float]:
        import av

        frames = []
        with av.open(_source(self._src)) as c:
            vs = c.streams.video[0]
            fps = float(vs.average_rate or vs.guessed_rate or 0) or 0.0
            for fr in c.decode(vs):
                frames.append(fr.to_ndarray(format="rgb24"))
        if not frames:
            raise MediaError("0 frames")
        return np.stack(frames), fps

    def __len__(self) -> int:
        return self.num_frames

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        if self.width <= 0 or self.height <= 0 or frames.shape[1:3] == (self.height, self.width):
            return frames
        return resize_frames(frames, self.width, self.height)

    def get(self, indices: Sequence[int] | None = None) -> np.ndarray:
        idx = list(range(self.num_frames)) if indices is None else [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.num_frames]
        if bad:
            raise MediaError(f"frame indices {bad[:5]} outside [0, {self.num_frames})")
        if not idx:
            return np.zeros((0, max(self.height, 0), max(self.width, 0), 3), np.uint8)
        if self._vr is not None:
            # decord mis-decodes some frame widths (8, 12, 16, 24, 48, 72 px): get_batch raises, or frames come back
            # with the wrong channel count. Check the result and fall back to PyAV for such sources.
            try:
                with quiet_stderr([]):
                    out = self._vr.get_batch(idx).asnumpy()
                if out.ndim == 4 and out.shape[0] == len(idx) and out.shape[-1] == 3:
                    if not self._fast or out.shape[1:3] == (self.height, self.width):
                        return self._resize(out)
            except Exception:
                pass
            if self._fast:  # decode-time resize failed for this size: decode natively, resize with Pillow
                import decord

                self._fast = False
                try:
                    with quiet_stderr([]):
                        self._vr = decord.VideoReader(_source(self._src), num_threads=1)
                    return self.get(idx)
                except Exception:
                    pass
            if self._strict:
                raise MediaError("decord returned malformed frames (backend 'decord' has no PyAV fallback)")
            self._vr = None
            self._frames, _ = self._decode_all_pyav()
        assert self._frames is not None
        if max(idx) >= len(self._frames):
            raise MediaError(f"frame {max(idx)} requested, the stream decodes to {len(self._frames)} frames")
        return self._resize(self._frames[idx])


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 -> ``[T, height, width, 3]`` (Pillow bicubic; antialiased when shrinking)."""
    from PIL import Image

    size = (int(width), int(height))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC, reducing_gap=3.0)) for f in frames])


def read_video(
    src: str | os.PathLike | bytes,
    indices: Sequence[int] | None = None,
    width: int = -1,
    height: int = -1,
    fast_resize: bool = True,
) -> np.ndarray:
    """Decode frames ``indices`` (default all) as ``[T, H, W, 3]`` uint8, optionally resized to ``width`` x
    ``height`` (-1 keeps the source size; see ``FrameReader``).  decord first, PyAV fallback."""
    return FrameReader(src, width, height, fast_resize=fast_resize).get(indices)


def probe_image(src: str | os.PathLike | bytes) -> dict:
    """``{"width", "height", "mode", "format"}`` of an image; raises MediaError when Pillow cannot decode it."""
    from PIL import Image

    try:
        with Image.open(_source(src)) as im:
            im.load()  # full decode: truncated files fail here
            return {"width": int(im.width), "height": int(im.height), "mode": im.mode, "format": im.format}
    except Exception as e:
        raise MediaError(f"cannot read image ({e})") from e


def read_image(src: str | os.PathLike | bytes) -> np.ndarray:
    """Decode an image as ``[H, W, 3]`` uint8 RGB."""
    from PIL import Image

    try:
        with Image.open(_source(src)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise MediaError(f"cannot read image ({e})") from e


def encode_image(img: Any, ext: str = "png", quality: int = 92, value_range: tuple[float, float] = (-1.0, 1.0)) -> bytes:
    """``[H, W, C]`` (uint8, or float in ``value_range``) -> encoded bytes of format ``ext``."""
    from PIL import Image

    a = to_uint8(img, value_range)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[ext.lower()]
    im = Image.fromarray(a)
    if fmt == "JPEG" and im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    bio = io.BytesIO()
    kw = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}
    im.save(bio, format=fmt, **kw)
    return bio.getvalue()


def short_side_size(width: int, height: int, short_side: int, even: bool = True) -> tuple[int, int]:
    """(w, h) with the short side equal to ``short_side`` and the aspect ratio kept (rounded to even sizes)."""
    s = float(short_side) / min(width, height)
    w, h = max(1, round(width * s)), max(1, round(height * s))
    if even:
        w, h = max(2, w - w % 2), max(2, h - h % 2)
    return int(w), int(h)


# ------------------------------------------------------------------------------------------------------------- audio
#: separate audio members (video2dataset writes ``{key}.m4a`` beside ``{key}.mp4``) and audio-only files
AUDIO_EXTS = ("wav", "flac", "mp3", "m4a", "ogg", "opus", "aac")


def resample_audio(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """``[C, S]`` float32 at ``src_rate`` -> ``[C, S']`` at ``dst_rate`` (polyphase, scipy ``resample_poly``).

    Output sample ``k`` lies at input time ``k / dst_rate``: ``S' = ceil(S * dst / src)``, so the duration is kept."""
    src_rate, dst_rate = int(src_rate), int(dst_rate)
    if src_rate == dst_rate or x.shape[-1] == 0:
        return np.ascontiguousarray(x, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(src_rate, dst_rate)
    return resample_poly(x, dst_rate // g, src_rate // g, axis=-1).astype(np.float32)


def read_audio(src: str | os.PathLike | bytes, start: float = 0.0, duration: float | None = None,
               sample_rate: int | None = None, mono: bool = True) -> tuple[np.ndarray, int] | None:
    """The audio track of a video or audio file/byte string between ``start`` and ``start + duration`` seconds.

    Returns ``(float32 [C, S] in [-1, 1], rate)`` (``C = 1`` with ``mono``: the mean of the channels), or None when the
    source has no audio stream. Time 0 is the start of the *video* stream when there is one (frame ``i`` of a clip
    sits at ``i / fps``), else of the audio stream. With ``sample_rate`` the track is resampled (polyphase) and the
    window is cut on the target grid: exactly ``round(duration * sample_rate)`` samples starting at sample
    ``round(start * sample_rate)``; what lies beyond the track's end is silence (zeros). PyAV decodes (a dependency
    already: the mp4 writer uses it); decoding stops once the window is covered."""
    import av

    try:
        with av.open(_source(src)) as c:
            if not c.streams.audio:
                return None
            ast = c.streams.audio[0]
            origin = 0.0
            if c.streams.video and c.streams.video[0].start_time is not None:
                vs = c.streams.video[0]
                origin = float(vs.start_time * vs.time_base)
            rate = int(ast.codec_context.sample_rate or ast.rate or 0)
            to = av.AudioResampler(format="fltp")  # planar float, original layout and rate
            end = None if duration is None else start + duration + 0.05
            chunks, first = [], None
            for packet in c.demux(ast):
                for frame in packet.decode():
                    for fr in to.resample(frame):
                        a = fr.to_ndarray().astype(np.float32)
                        if first is None:
                            first = float(fr.time) if fr.time is not None else 0.0
                            rate = fr.sample_rate or rate
                        chunks.append(a)
                if end is not None and first is not None and first + sum(x.shape[-1] for x in chunks) / rate > end - origin:
                    break
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot decode audio ({printable(str(e))})") from None
    if rate <= 0:
        raise MediaError("audio stream without a sample rate")
    if not chunks:
        x = np.zeros((1, 0), np.float32)
        first = 0.0
    else:
        x = np.concatenate(chunks, axis=-1)
    if mono:
        x = x.mean(0, keepdims=True)
    offset = (first or 0.0) - origin  # seconds of decoded sample 0 on the video timeline
    lead = int(round(offset * rate))  # place the track on the timeline: leading silence or dropped samples
    x = np.pad(x, ((0, 0), (lead, 0))) if lead > 0 else x[:, -lead:]
    dst = int(sample_rate or rate)
    if dst != rate:
        g = math.gcd(rate, dst)
        down, up = rate // g, dst // g
        n0 = max(0, int(math.floor(start * rate)) - 64 * down) // down * down  # resample from a grid-aligned sample
        x = resample_audio(x[:, n0:], rate, dst)
        k0 = n0 * up // down
    else:
        k0 = 0
    a = int(round(start * dst)) - k0
    n = x.shape[-1] - max(a, 0) if duration is None else int(round(duration * dst))
    out = np.zeros((x.shape[0], max(n, 0)), np.float32)
    seg = x[:, max(a, 0):max(a, 0) + n]
    out[:, :seg.shape[-1]] = seg
    return np.clip(out, -1.0, 1.0), dst


def encode_audio_wav(audio: Any, sample_rate: int) -> bytes:
    """Float audio ``[C, S]`` (or ``[S]``) in [-1, 1] -> 16-bit PCM wav bytes."""
    import wave

    a = _to_numpy(audio).astype(np.float32)
    a = a.reshape(1, -1) if a.ndim == 1 else a
    pcm = (np.clip(a, -1, 1) * 32767).round().astype("<i2").T  # [S, C]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
