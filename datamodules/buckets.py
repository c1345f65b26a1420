"""Open-Sora v1.2 variable resolution and duration (spec latte_tora.md §3.3 "Buckets") on top of the stream's buckets.

``bucket_config[resolution][frames] = (keep_prob, batch_size)``; ``keep_prob`` may be a pair ``(keep_prob,
frame_keep_prob)``: the second number gates the frame bucket itself. Every training sample is assigned, from its
metadata (``{key}.json``: ``height``, ``width``, ``num_frames`` for videos), to one bucket the way Open-Sora's
``Bucket.get_bucket_id`` does it:

1. resolutions are tried from the largest pixel count down; one is eligible when the sample has at least 80% of its
   pixels;
2. an image (one frame) takes the resolution's frame bucket 1, if the resolution has one, with probability keep_prob;
3. a video takes the longest frame bucket ``t`` (not 1) with ``num_frames > t * frame_stride`` whose frame gate
   passes; then it is kept with probability keep_prob, else the next (smaller) resolution is tried;
4. the aspect ratio is the closest of ``aspect_ratios`` (height / width); the clip size is
   ``sqrt(pixels * ar) x sqrt(pixels / ar)`` rounded to a multiple of ``multiple`` [our rounding: Open-Sora's
   tables round to even sizes; 16 = VAE 8 x patch 2 keeps every clip patchable].

A sample that fits no bucket is dropped (counted as ``bucket_dropped``, not as a bad sample). The stream groups samples
by clip shape already, so a batch is one bucket; its batch size is the bucket's. The random draws are seeded by the
sample's identity and pass, so a resumed run re-assigns held samples to the same buckets (exact resume is kept).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from .decode import SkipSample, parse_meta, sample_kind
from .stream import VideoStream

__all__ = ["OPEN_SORA_RESOLUTIONS", "ASPECT_RATIOS", "BucketConfig", "BucketedVideoStream"]

#: pixel counts of Open-Sora's named resolutions (opensora/datasets/aspect.py); a numeric name N means N x N
OPEN_SORA_RESOLUTIONS: dict[str, int] = {
    "144p": 36864, "256": 65536, "240p": 102240, "360p": 230400, "512": 262144, "480p": 409920, "720p": 921600,
    "1024": 1048576, "1080p": 2073600, "2k": 3686400, "2048": 4194304,
}

#: height / width ratios (Open-Sora's named ones: 3:8 ... 16:9, and their portrait/landscape mirrors)
ASPECT_RATIOS: tuple[float, ...] = (0.38, 0.43, 0.48, 0.50, 0.53, 0.54, 0.56, 0.62, 0.67, 0.75, 1.00, 1.33, 1.50, 1.78,
                                    1.85, 2.00, 2.08, 2.33, 2.67)

_SALT = 0xB0C4E7


class BucketConfigError(ValueError):
    """A bucket_config that cannot work; the message names the entry and the fix."""


def resolution_pixels(name: str | int) -> int:
    name = str(name)
    if name in OPEN_SORA_RESOLUTIONS:
        return OPEN_SORA_RESOLUTIONS[name]
    if name.isdigit():
        return int(name) ** 2
    raise BucketConfigError(f"bucket_config resolution {name!r} is unknown; use one of {sorted(OPEN_SORA_RESOLUTIONS)} "
                            "or a number N for N x N pixels")


@dataclasses.dataclass(frozen=True)
class Bucket:
    resolution: str
    frames: int
    aspect: float
    height: int
    width: int
    batch_size: int


class BucketConfig:
    """Parsed ``bucket_config`` with Open-Sora's assignment rule (module docstring)."""

    def __init__(self, config: Mapping, aspect_ratios: tuple[float, ...] = ASPECT_RATIOS, multiple: int = 16,
                 approx: float = 0.8):
        if not isinstance(config, Mapping) or not config:
            raise BucketConfigError("bucket_config must map resolution -> {frames: [keep_prob, batch_size]}")
        self.multiple, self.approx, self.aspect_ratios = int(multiple), float(approx), tuple(aspect_ratios)
        self.table: list[tuple[str, int, list[tuple[int, float, float | None, int | None]]]] = []
        for res, frames in config.items():
            pixels = resolution_pixels(res)
            if not isinstance(frames, Mapping) or not frames:
                raise BucketConfigError(f"bucket_config[{res!r}] must map frame counts to [keep_prob, batch_size]")
            rows = []
            for t, spec in frames.items():
                try:
                    t = int(t)
                    prob, bs = spec
                except (TypeError, ValueError):
                    raise BucketConfigError(f"bucket_config[{res!r}][{t!r}] must be [keep_prob, batch_size] "
                                            f"(keep_prob may be [keep_prob, frame_keep_prob]), got {spec!r}") from None
                keep, gate = (float(prob[0]), float(prob[1])) if isinstance(prob, (list, tuple)) else (float(prob), None)
                if t < 1 or not 0 <= keep <= 1 or (gate is not None and not 0 <= gate <= 1):
                    raise BucketConfigError(f"bucket_config[{res!r}][{t}]: frames >= 1 and probabilities in [0, 1]")
                if keep > 0 and (bs is None or int(bs) < 1):
                    raise BucketConfigError(f"bucket_config[{res!r}][{t}]: a kept bucket needs a batch size >= 1")
                rows.append((t, keep, gate, None if bs is None else int(bs)))
            rows.sort(key=lambda r: -r[0])
            self.table.append((str(res), pixels, rows))
        self.table.sort(key=lambda r: -r[1])
        self._ids = {(res, t): i for i, (res, t) in enumerate((r, row[0]) for r, _, rows in self.table for row in rows)}

    def size(self, resolution: str, aspect: float) -> tuple[int, int]:
        pixels = resolution_pixels(resolution)
        m = self.multiple
        return (max(m, round(math.sqrt(pixels * aspect) / m) * m), max(m, round(math.sqrt(pixels / aspect) / m) * m))

    def batch_sizes(self) -> dict[tuple[int, int, int], int]:
        """(frames, height, width) -> batch size of every kept bucket (the smallest when two share a shape)."""
        out: dict[tuple[int, int, int], int] = {}
        for res, _, rows in self.table:
            for t, keep, _, bs in rows:
                if keep > 0:
                    for ar in self.aspect_ratios:
                        h, w = self.size(res, ar)
                        out[(t, h, w)] = min(bs, out.get((t, h, w), bs))
        return out

    def assign(self, frames: int, height: int, width: int, seed, frame_stride: int = 1) -> Bucket | None:
        """The bucket of a ``frames x height x width`` sample, or None (dropped). ``seed``: ints identifying the
        sample and pass (the draws are reproducible); ``frame_stride``: a frame bucket t needs > t * stride frames."""
        def draw(res: str, t: int) -> float:
            return float(np.random.default_rng([*seed, _SALT, self._ids[(res, t)]]).random())

        area = height * width
        for res, pixels, rows in self.table:
            if area < pixels * self.approx:
                continue
            chosen = None
            if frames == 1:
                row = next((r for r in rows if r[0] == 1), None)
                if row is None or not (row[1] >= 1 or draw(res, 1) < row[1]):
                    continue
                chosen = row
            else:
                for row in rows:
                    t, keep, gate, _ = row
                    if gate is not None and draw(res, t) > gate:
                        continue
                    if t != 1 and frames > t * frame_stride:
                        chosen = row
                        break
                if chosen is None or not (chosen[1] >= 1 or draw(res, chosen[0]) < chosen[1]):
                    continue
            aspect = min(self.aspect_ratios, key=lambda a: abs(a - height / width))
            h, w = self.size(res, aspect)
            return Bucket(res, chosen[0], aspect, h, w, chosen[3])
        return None


class BucketedVideoStream(VideoStream):
    """``VideoStream`` whose training clips take their shape (frames, height, width) and batch size from the sample's
    Open-Sora bucket instead of the stage's single clip shape."""

    def __init__(self, sources, cfg, stages, buckets: BucketConfig):
        super().__init__(sources, cfg, stages)
        self.buckets = buckets
        self._bs = buckets.batch_sizes()

    def bucket_batch_size(self, bkey: tuple, default: int) -> int:
        shape = tuple(int(x) for x in bkey[3])
        thw = (1, *shape[-2:]) if bkey[2] == "image" else tuple(shape[-3:])
        return self._bs.get(thw, default)

    def _decode(self, stream, got, pos, spec, counters, recount: bool = True):
        key, raw, url, (ui, tar_pos) = got
        kind = sample_kind(raw)
        if kind is None:  # token/latent shards carry their own shape
            return super()._decode(stream, got, pos, spec, counters, recount)
        try:
            meta = parse_meta(raw)
        except SkipSample:
            meta = {}
        frames = 1 if kind[0] == "image" else meta.get("num_frames")
        h, w = meta.get("height"), meta.get("width")
        if not all(isinstance(v, (int, float)) and v > 0 for v in (frames, h, w)):
            counters["no_size_meta"] = counters.get("no_size_meta", 0) + 1
            return None
        b = self.buckets.assign(int(frames), int(h), int(w), (self.cfg.seed, stream.si, int(pos[0]), int(ui),
                                                               int(tar_pos)), spec.frame_stride)
        if b is None:
            if recount:
                counters["bucket_dropped"] = counters.get("bucket_dropped", 0) + 1
            return None
        spec = dataclasses.replace(spec, num_frames=b.frames, height=b.height, width=b.width)
        return super()._decode(stream, got, pos, spec, counters, recount)
