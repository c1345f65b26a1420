"""`vidgen shards`: pack a folder of videos/images (or a CSV/JSONL list) into WebDataset tar shards.

A sample is ``{key}.{mp4|webm|...|jpg|png|webp}`` plus ``{key}.txt`` (caption, when given), ``{key}.json``
(metadata: fps, num_frames, width, height, duration, source, clip start/end, label) and ``{key}.cls`` (ASCII int,
when a label is given).  Shards are ``{prefix}-{000000}.tar`` beside an ``index.json`` (DEVELOPERS.md):
``{"format": "vidgen-shards/1", "num_samples": N, "shards": {name: {"num_samples": n, "bytes": b}}, "skipped": [...]}``.

Videos are copied byte-for-byte unless cutting/resizing/resampling is asked for; then each clip is decoded (resized at
decode time) and re-encoded to mp4 with PyAV (libx264 when the wheel has it, else mpeg4); a soundtrack is kept: the
clip's time span of it is cut and muxed as AAC (own rate and channels; ``audio_rate`` in the json).  ``--scene-cuts`` first
splits a video where consecutive downscaled frames differ strongly (colour-histogram and mean-absolute-difference
thresholds; see ``detect_scene_cuts``), so no clip straddles a cut.  Hard cuts only: cross-fades are not detected
(compared with PySceneDetect's content/adaptive detectors in ``benchmarks/scene_cuts.py``; this one scored higher).

Keys are ``{input index:06d}_{file stem}`` (``_{clip:04d}`` appended when cutting): deterministic, unique, dot-free.
Unreadable inputs are skipped, listed at the end and in ``index.json`` under ``"skipped"``.

Examples::

    vidgen shards videos/ data/my_shards --max-samples 500 --workers 4
    vidgen shards list.csv data/clips --clip-seconds 2 --scene-cuts --resize-short-side 128 --max-bytes 1G
    vidgen shards --reindex data/my_shards
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import math
import os
import re
import sys
import tarfile
import time
from typing import Any, Iterable, Iterator

import numpy as np

from vidgen.datamodules.filelist import (CLASSES_FORMAT, CLASSES_NAME, FileListError, Item, assign_labels,  # noqa: F401
                                        is_file_list, make_item, parse_label, read_class_map, read_list, sample_key,
                                        sample_members, sanitize_key)
from vidgen.datamodules.tario import INDEX_NAME, index_entry, make_index, write_index
from vidgen.datamodules import media
VIDEO_EXTS, IMAGE_EXTS = media.VIDEO_EXTS, media.IMAGE_EXTS
_RECORD = tarfile.RECORDSIZE  # tarfile pads the archive to a multiple of this on close
_BLOCK = tarfile.BLOCKSIZE


#: bad input or options for `vidgen shards` (the message names the fix); the list reader it shares with the
#: datamodule raises the same class
ShardsError = FileListError
_parse_label, _item = parse_label, make_item


# ------------------------------------------------------------------------------------------------------------ inputs
def _media_kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def collect_items(source: str | os.PathLike, folder_labels: str = "auto") -> list[Item]:
    """Items from a folder (recursive, sorted; a ``{stem}.txt`` beside a file is its caption), a CSV or JSONL list
    (``datamodules/filelist.py``: columns ``path``, optional ``text`` or ``caption``, ``label`` -- an int id or a class
    name; relative paths are relative to the list file) or one file.

    Folder labels (``folder_labels``): ``auto`` names each file's class by its top-level subfolder when every media
    file sits in one (the UCF-101 / ImageFolder layout ``root/<class>/<file>``), ``folders`` insists on that layout,
    ``none`` gives no labels."""
    source = os.fspath(source)
    if folder_labels not in ("auto", "folders", "none"):
        raise ShardsError(f"labels must be auto, folders or none, got {folder_labels!r}")
    if os.path.isdir(source):
        items = []
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or _media_kind(name) is None:
                    continue
                path = os.path.join(root, name)
                side = os.path.splitext(path)[0] + ".txt"
                caption = None
                if os.path.isfile(side):
                    with open(side, encoding="utf-8", errors="replace") as f:
                        caption = f.read().strip()
                items.append(Item(path, caption))
        items.sort(key=lambda it: os.path.relpath(it.path, source))
        top = [it for it in items if os.sep not in os.path.relpath(it.path, source)]
        if folder_labels == "folders" and (top or not items):
            raise ShardsError(f"--labels folders: {source} must hold class subfolders only "
                              f"({len(top)} media file(s) sit at its top level, e.g. {top[0].path if top else '-'})")
        if folder_labels != "none" and items and not top:
            for it in items:
                it.class_name = os.path.relpath(it.path, source).split(os.sep)[0]
        return items
    if not os.path.isfile(source):
        raise ShardsError(f"input {source!r} does not exist; give a folder of videos/images, a .csv or a .jsonl list")
    if is_file_list(source) or source.lower().endswith(".json"):
        return read_list(source)
    if _media_kind(source):
        return [Item(source)]
    raise ShardsError(f"input {source!r}: expected a folder, a .csv, a .jsonl or a media file ({', '.join(VIDEO_EXTS + IMAGE_EXTS)})")


def _as_items(items: Any, folder_labels: str = "auto") -> list[Item]:
    if isinstance(items, (str, os.PathLike)):
        return collect_items(items, folder_labels)
    out = []
    for it in items:
        if isinstance(it, Item):
            out.append(it)
        elif isinstance(it, (str, os.PathLike)):
            out.append(Item(os.fspath(it)))
        elif isinstance(it, dict):
            out.append(_item(os.fspath(it["path"]), it.get("caption"), it.get("label"), str(it["path"])))
        else:
            raise ShardsError(f"items must be paths, dicts with 'path' or Item, got {type(it).__name__}")
    return out


# ------------------------------------------------------------------------------------------------------- scene cuts
def frame_change_scores(frames: np.ndarray, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """For ``[T, H, W, C]`` uint8 frames (small, e.g. 32x32): per transition t-1 -> t (length T-1) the
    colour-histogram distance (half L1 of per-channel normalised histograms, averaged over channels; 0..1) and the
    mean absolute pixel difference (0..1)."""
    f = np.asarray(frames)
    if f.ndim == 3:
        f = f[..., None]
    t, h, w, c = f.shape
    if t < 2:
        return np.zeros(0), np.zeros(0)
    q = (f.astype(np.int64) * bins) >> 8  # bin index per pixel and channel
    hist = np.zeros((t, c, bins))
    for ch in range(c):
        flat = q[..., ch].reshape(t, -1) + np.arange(t)[:, None] * bins
        hist[:, ch] = np.bincount(flat.ravel(), minlength=t * bins).reshape(t, bins)
    hist /= h * w
    hd = 0.5 * np.abs(np.diff(hist, axis=0)).sum(-1).mean(-1)
    mad = np.abs(np.diff(f.astype(np.float32), axis=0)).mean(axis=(1, 2, 3)) / 255.0
    return hd, mad


def detect_scene_cuts(
    frames: np.ndarray,
    threshold: float = 0.2,
    min_pixel_change: float = 0.05,
    min_scene_frames: int = 4,
) -> list[int]:
    """Indices of the first frame of each new scene (0 excluded) in downscaled ``[T, H, W, C]`` uint8 frames.

    A cut is a transition whose colour-histogram distance exceeds ``threshold`` and whose mean absolute pixel
    change exceeds ``min_pixel_change`` (both scores in 0..1, see ``frame_change_scores``); a cut closer than
    ``min_scene_frames`` to the previous one is dropped (flashes)."""
    hd, mad = frame_change_scores(frames)
    cuts: list[int] = []
    for i in np.flatnonzero((hd > threshold) & (mad > min_pixel_change)):
        start = int(i) + 1
        if start - (cuts[-1] if cuts else 0) >= min_scene_frames:
            cuts.append(start)
    return cuts


def find_scene_cuts(src: str | bytes, size: int = 32, **kw) -> list[int]:
    """Decode a video at ``size`` x ``size`` and return its scene-cut frame indices (see ``detect_scene_cuts``)."""
    return detect_scene_cuts(media.read_video(src, width=size, height=size, fast_resize=True), **kw)


# ------------------------------------------------------------------------------------------------------- processing
@dataclasses.dataclass
class ShardOptions:
    """How each input becomes samples (shared by the CLI and the API)."""

    clip_len_s: float | None = None  # cut videos into clips of this many seconds
    clip_frames: int | None = None  # ... or of this many frames (after fps resampling)
    min_clip_frames: int | None = None  # keep a shorter trailing clip when it has at least this many frames
    scene_cuts: bool = False
    scene_threshold: float = 0.2
    resize_short_side: int | None = None
    fps: float | None = None  # resample (drop frames) to at most this fps when transcoding
    crf: int = 18
    max_clips_per_video: int | None = None

    @property
    def transcode(self) -> bool:
        return bool(self.clip_len_s or self.clip_frames or self.scene_cuts or self.resize_short_side or self.fps)

    def validate(self) -> None:
        if self.clip_len_s is not None and not self.clip_len_s > 0:
            raise ShardsError(f"clip length must be > 0 seconds, got {self.clip_len_s}")
        if self.clip_frames is not None and self.clip_frames < 1:
            raise ShardsError(f"clip frames must be >= 1, got {self.clip_frames}")
        if self.clip_len_s and self.clip_frames:
            raise ShardsError("give either a clip length in seconds or in frames, not both")
        if self.resize_short_side is not None and self.resize_short_side < 2:
            raise ShardsError(f"--resize-short-side must be >= 2 pixels, got {self.resize_short_side}")
        if self.fps is not None and not self.fps > 0:
            raise ShardsError(f"--fps must be > 0, got {self.fps}")


def _clip_ranges(segments: list[tuple[int, int]], clip_frames: int | None, min_frames: int) -> list[tuple[int, int]]:
    """[start, end) ranges over the selected-frame list: segments chopped into ``clip_frames`` pieces."""
    out = []
    for s, e in segments:
        if clip_frames is None:
            if e - s >= min_frames:
                out.append((s, e))
            continue
        for a in range(s, e, clip_frames):
            b = min(a + clip_frames, e)
            if b - a >= min_frames:
                out.append((a, b))
    return out


def _video_samples(idx: int, item: Item, opts: ShardOptions) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    ext = os.path.splitext(item.path)[1].lower().lstrip(".")
    base = sample_key(idx, item.path)
    if not opts.transcode:
        with open(item.path, "rb") as f:
            data = f.read()
        meta = media.probe_video(item.path)
        info = dict(meta, clip_start=0.0, clip_end=meta["duration"], clip_start_frame=0, clip_end_frame=meta["num_frames"])
        return [(base, _members(base, ext, data, item, info))], None

    probe = media.probe_video(item.path)
    src_fps, n = probe["fps"] or 25.0, probe["num_frames"]
    out_fps = src_fps
    sel = np.arange(n)
    if opts.fps and opts.fps < src_fps - 1e-6:
        out_fps = float(opts.fps)
        sel = np.unique(np.floor(np.arange(0, n * out_fps / src_fps) * src_fps / out_fps + 1e-6).astype(int))
        sel = sel[sel < n]
    # scene boundaries, in positions of the selected-frame list
    bounds = [0, len(sel)]
    if opts.scene_cuts:
        cuts = find_scene_cuts(item.path, threshold=opts.scene_threshold)
        bounds = sorted(set([0, len(sel)] + [int(np.searchsorted(sel, c)) for c in cuts]))
    segments = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    clip_frames = opts.clip_frames or (max(1, int(round(opts.clip_len_s * out_fps))) if opts.clip_len_s else None)
    min_frames = opts.min_clip_frames if opts.min_clip_frames is not None else (clip_frames or 1)
    ranges = _clip_ranges(segments, clip_frames, max(1, min_frames))
    if opts.max_clips_per_video:
        ranges = ranges[: opts.max_clips_per_video]
    if not ranges:
        need = f"{min_frames} frames" + (f" at {out_fps:g} fps" if clip_frames else "")
        return [], f"no clip: video has {len(sel)} usable frames{' in scenes of ' + str([b - a for a, b in segments]) if opts.scene_cuts else ''}, a clip needs {need}"
    w, h = probe["width"], probe["height"]
    if opts.resize_short_side and min(w, h) != opts.resize_short_side:
        w, h = media.short_side_size(w, h, opts.resize_short_side)
        reader = media.FrameReader(item.path, w, h)
    else:
        reader = media.FrameReader(item.path)
    samples = []
    cutting = clip_frames is not None or opts.scene_cuts
    has_audio = media.read_audio(item.path, 0.0, 0.0) is not None
    for ci, (a, b) in enumerate(ranges):
        frames = reader.get(sel[a:b])
        fa, fb = int(sel[a]), int(sel[b - 1]) + 1
        sound = None
        if has_audio:  # the soundtrack of the clip's time span, at its own rate and channels (kept, not resampled)
            sound = media.read_audio(item.path, fa / src_fps, (b - a) / out_fps, mono=False)
        data = media.encode_video(frames, out_fps, crf=opts.crf, layout="thwc",
                                  audio=None if sound is None else sound[0], sample_rate=None if sound is None else sound[1])
        key = f"{base}_{ci:04d}" if cutting else base
        info = {
            "fps": float(out_fps),
            "num_frames": int(b - a),
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
            "duration": float((b - a) / out_fps),
            "clip_start": float(fa / src_fps),
            "clip_end": float(fb / src_fps),
            "clip_start_frame": fa,
            "clip_end_frame": fb,
            "clip_index": ci,
            "source_fps": float(src_fps),
        }
        if sound is not None:
            channels = int(sound[0].shape[0])
            info["audio_rate"], info["audio_channels"] = int(sound[1]), channels if channels <= 2 else 1
        samples.append((key, _members(key, "mp4", data, item, info)))
    return samples, None


def _image_samples(idx: int, item: Item, opts: ShardOptions) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    ext = os.path.splitext(item.path)[1].lower().lstrip(".")
    base = sample_key(idx, item.path)
    with open(item.path, "rb") as f:
        data = f.read()
    info = media.probe_image(data)
    w, h = info["width"], info["height"]
    if opts.resize_short_side and min(w, h) != opts.resize_short_side:
        from PIL import Image

        w, h = media.short_side_size(w, h, opts.resize_short_side, even=False)
        img = media.read_image(data)
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        data = media.encode_image(img, ext)
    meta = {"fps": 0.0, "num_frames": 1, "width": int(w), "height": int(h), "duration": 0.0}
    return [(base, _members(base, ext, data, item, meta, kind="image"))], None


def _members(key: str, ext: str, data: bytes, item: Item, info: dict, kind: str = "video") -> dict[str, bytes]:
    return {ext: data, **sample_members(key, item, info, kind)[1]}


def process_item(idx: int, item: Item, opts: ShardOptions) -> tuple[int, list[tuple[str, dict[str, bytes]]], str | None]:
    """One input -> (idx, [(key, {ext: bytes})], skip reason or None).  Never raises on bad media."""
    try:
        kind = _media_kind(item.path)
        if kind is None:
            return idx, [], "unsupported extension"
        if not os.path.isfile(item.path):
            return idx, [], "file not found"
        samples, reason = (_video_samples if kind == "video" else _image_samples)(idx, item, opts)
        return idx, samples, reason
    except Exception as e:  # unreadable media: reported, never fatal
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        return idx, [], msg[:300]


def _process_star(args):
    return process_item(*args)


# ----------------------------------------------------------------------------------------------------------- writing
def _member_bytes(size: int) -> int:
    return _BLOCK + ((size + _BLOCK - 1) // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes samples into ``{prefix}-{i:06d}.tar`` files (atomically: a hidden temp name, renamed when complete),
    starting a new shard before a sample would push the current one past ``max_samples`` or ``max_bytes`` (exact
    final tar size, padding included).  A single sample bigger than ``max_bytes`` gets a shard of its own."""

    def __init__(self, out_dir: str, prefix: str = "shard", max_samples: int | None = None, max_bytes: int | None = None):
        if max_samples is not None and max_samples < 1:
            raise ShardsError(f"max samples per shard must be >= 1, got {max_samples}")
        if max_bytes is not None and max_bytes < _RECORD:
            raise ShardsError(f"max bytes per shard must be >= {_RECORD} (the smallest tar), got {max_bytes}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ShardsError(f"shard prefix {prefix!r} may only use letters, digits, '_' and '-'")
        self.out_dir, self.prefix = out_dir, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        os.makedirs(out_dir, exist_ok=True)
        self.shards: dict[str, dict] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp = self._name = ""
        self._count = self._offset = 0
        self._next = 0
        self.num_samples = 0

    def _open(self) -> None:
        self._name = f"{self.prefix}-{self._next:06d}.tar"
        self._next += 1
        self._tmp = os.path.join(self.out_dir, f".{self._name}.{os.getpid()}.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._offset = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = os.path.join(self.out_dir, self._name)
        os.replace(self._tmp, final)
        self.shards[self._name] = {"num_samples": self._count, "bytes": os.path.getsize(final)}
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(_member_bytes(len(v)) for v in members.values())
        if self._tar is not None and self._count > 0:
            full = self.max_samples is not None and self._count >= self.max_samples
            if self.max_bytes is not None:
                final = math.ceil((self._offset + size + 2 * _BLOCK) / _RECORD) * _RECORD
                full = full or final > self.max_bytes
            if full:
                self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members.items():
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            ti.uname = ti.gname = ""
            self._tar.addfile(ti, io.BytesIO(data))
        self._offset += size
        self._count += 1
        self.num_samples += 1

    def close(self) -> dict[str, dict]:
        self._finish()
        return dict(sorted(self.shards.items()))

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


def clear_old_shards(out_dir: str, prefix: str, overwrite: bool) -> None:
    """Remove ``{prefix}-*.tar`` (and stale temp files) from ``out_dir``; without ``overwrite`` refuse when any exist."""
    old = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{prefix}-*.tar")))
    if old and not overwrite:
        raise ShardsError(
            f"{out_dir} already holds {len(old)} '{prefix}-*.tar' shard(s); pass --overwrite (overwrite=True) to replace "
            "them, or choose another output folder/--prefix"
        )
    for p in old + glob.glob(os.path.join(glob.escape(out_dir), f".{prefix}-*.tmp")):
        os.remove(p)


def parse_size(text: str | int | None) -> int | None:
    """'500M', '1.5G', '20000', 20000 -> bytes (K/M/G/T are powers of 1024)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", str(text), re.I)
    if not m:
        raise ShardsError(f"size {text!r} not understood; use e.g. 500M, 1G or a byte count")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def write_shards(
    items: str | os.PathLike | Iterable[Any],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_samples_per_shard: int | None = 1000,
    max_bytes_per_shard: int | str | None = None,
    clip_len_s: float | None = None,
    scene_cuts: bool = False,
    workers: int = 1,
    *,
    clip_frames: int | None = None,
    min_clip_frames: int | None = None,
    scene_threshold: float = 0.2,
    resize_short_side: int | None = None,
    fps: float | None = None,
    crf: int = 18,
    max_clips_per_video: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    verbose: bool = False,
    labels: str = "auto",
    class_map: str | None = None,
) -> dict:
    """Pack ``items`` (a folder/CSV/JSONL path, or a list of paths / ``{"path", "caption", "label"}`` dicts / Item)
    into shards in ``out_dir``; writes ``index.json`` and returns it (``"skipped"``: [{path, reason}] of inputs that
    gave no sample).  ``workers`` > 1 decodes/encodes in a process pool; output order never depends on it.

    Class names (class subfolders with ``labels`` auto/folders, or string labels in a CSV/JSONL) become integer labels
    (``.cls`` and json ``label``, json ``class_name``) through ``out_dir/classes.json``, which ``index.json`` names
    (``"classes"``; plus ``"num_classes"`` and ``"num_labelled"``).  ``class_map``: an existing ``classes.json`` (e.g.
    the train split's, when packing val) so the ids agree."""
    out_dir = os.fspath(out_dir)
    opts = ShardOptions(
        clip_len_s=clip_len_s,
        clip_frames=clip_frames,
        min_clip_frames=min_clip_frames,
        scene_cuts=scene_cuts,
        scene_threshold=scene_threshold,
        resize_short_side=resize_short_side,
        fps=fps,
        crf=crf,
        max_clips_per_video=max_clips_per_video,
    )
    opts.validate()
    item_list = _as_items(items, labels)
    if labels == "none":
        for it in item_list:
            it.class_name = None
    class_names = assign_labels(item_list, read_class_map(class_map) if class_map else None)
    writer = ShardWriter(out_dir, prefix, max_samples_per_shard, parse_size(max_bytes_per_shard))
    clear_old_shards(out_dir, prefix, overwrite)
    skipped: list[dict] = []
    labelled = [0]
    t0 = time.time()
    jobs = [(i, it, opts) for i, it in enumerate(item_list)]
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="shards", unit="file", disable=(not progress) if progress is not None else None)
    except ImportError:  # pragma: no cover
        bar = None
    pool = None
    try:
        if workers and workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            pool = mp.get_context().Pool(min(int(workers), len(jobs)))
            results: Iterator = pool.imap(_process_star, jobs, chunksize=1)
        else:
            results = (process_item(*j) for j in jobs)
        for idx, samples, reason in results:
            if reason is not None:
                skipped.append({"path": item_list[idx].path, "reason": reason})
            for key, members in samples:
                writer.write(key, members)
                labelled[0] += "cls" in members
            if bar is not None:
                bar.update(1)
                bar.set_postfix(samples=writer.num_samples, skipped=len(skipped), refresh=False)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    extra: dict[str, Any] = {"num_labelled": labelled[0]}
    if class_names is not None:
        cpath = os.path.join(out_dir, CLASSES_NAME)
        media.atomic_write(cpath, (json.dumps({"format": CLASSES_FORMAT, "classes": class_names}, indent=1) + "\n")
                           .encode("utf-8"))
        extra.update(classes=CLASSES_NAME, num_classes=len(class_names))
    index = make_index(shards, skipped, **extra)
    write_index(out_dir, index)
    if verbose:
        print(summary(index, out_dir, time.time() - t0), file=sys.stderr)
    return index


def summary(index: dict, out_dir: str, seconds: float | None = None) -> str:
    total = sum(s["bytes"] for s in index["shards"].values())
    lines = [
        f"wrote {index['num_samples']} samples in {len(index['shards'])} shard(s), {total / 2**20:.2f} MiB, to {out_dir}"
        + (f" in {seconds:.1f}s" if seconds is not None else "")
    ]
    skipped = index.get("skipped") or []
    if skipped:
        lines.append(f"skipped {len(skipped)} input(s):")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def reindex(shard_dir: str) -> dict:
    """Rebuild ``index.json`` of a folder of tars by reading their headers (keeps an old index's ``skipped``)."""
    tars = sorted(glob.glob(os.path.join(glob.escape(shard_dir), "*.tar")))
    if not tars:
        raise ShardsError(f"{shard_dir} holds no *.tar shards to index")
    old = {}
    ip = os.path.join(shard_dir, INDEX_NAME)
    if os.path.isfile(ip):
        try:
            with open(ip) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            old = {}
    shards = {os.path.basename(t): index_entry(t) for t in tars}
    keep = {k: old[k] for k in ("classes", "num_classes") if k in old}  # the class map stays with the shards
    index = make_index(shards, old.get("skipped"), **keep)
    write_index(shard_dir, index)
    return index


# --------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidgen shards",
        description="Pack videos/images (a folder, or a CSV/JSONL with path[,text|caption,label] as Open-Sora lays it out) into WebDataset tar shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", nargs="?", help="folder (recursive), .csv or .jsonl list, or one media file")
    p.add_argument("out_dir", nargs="?", help="output folder for {prefix}-000000.tar ... and index.json")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most (0: no limit)")
    p.add_argument("--max-bytes", default=None, help="bytes per shard at most, e.g. 500M, 1G")
    g = p.add_argument_group("cutting and re-encoding (videos are copied as-is otherwise)")
    g.add_argument("--clip-seconds", type=float, default=None, help="cut videos into clips of this length")
    g.add_argument("--clip-frames", type=int, default=None, help="cut videos into clips of this many frames")
    g.add_argument("--min-clip-frames", type=int, default=None, help="keep a shorter last clip with >= this many frames (default: full clips only)")
    g.add_argument("--scene-cuts", action="store_true", help="split at detected scene cuts first; no clip straddles a cut")
    g.add_argument("--scene-threshold", type=float, default=0.2, help="histogram distance (0..1) that marks a cut")
    g.add_argument("--resize-short-side", type=int, default=None, help="resize so the short side has N pixels")
    g.add_argument("--fps", type=float, default=None, help="drop frames down to this fps")
    g.add_argument("--crf", type=int, default=18, help="x264 quality of re-encoded clips (lower: better, bigger)")
    g.add_argument("--max-clips-per-video", type=int, default=None)
    p.add_argument("--labels", choices=("auto", "folders", "none"), default="auto",
                   help="folder input: class = top-level subfolder (auto: when every file sits in one)")
    p.add_argument("--class-map", default=None, help="an existing classes.json (e.g. the train split's) for the ids")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)), help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace existing {prefix}-*.tar shards in out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--reindex", metavar="DIR", default=None, help="only rebuild DIR/index.json from its tars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.reindex:
            index = reindex(args.reindex)
            print(summary(index, args.reindex))
            for name, entry in index["shards"].items():
                if entry.get("truncated"):
                    print(f"  {name}: truncated; {entry['num_samples']} complete sample(s) kept, "
                          f"{entry.get('incomplete_samples', 0)} cut sample(s) counted as bad")
            return 0
        if not args.input or not args.out_dir:
            p.error("give INPUT and OUT_DIR (or --reindex DIR)")
        t0 = time.time()
        index = write_shards(
            args.input,
            args.out_dir,
            prefix=args.prefix,
            max_samples_per_shard=args.max_samples or None,
            max_bytes_per_shard=args.max_bytes,
            clip_len_s=args.clip_seconds,
            scene_cuts=args.scene_cuts,
            workers=args.workers,
            clip_frames=args.clip_frames,
            min_clip_frames=args.min_clip_frames,
            scene_threshold=args.scene_threshold,
            resize_short_side=args.resize_short_side,
            fps=args.fps,
            crf=args.crf,
            max_clips_per_video=args.max_clips_per_video,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
            labels=args.labels,
            class_map=args.class_map,
        )
    except ShardsError as e:
        print(f"vidgen shards: error: {e}", file=sys.stderr)
        return 2
    print(summary(index, args.out_dir, time.time() - t0))
    if index.get("classes"):
        print(f"labels: {index['num_labelled']} samples in {index['num_classes']} classes "
              f"({os.path.join(args.out_dir, index['classes'])})")
    return 0 if index["num_samples"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
