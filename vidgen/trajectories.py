"""`vidgen trajectories`: optical flow, Tora's data filters and sparse trajectories for video shards (spec
latte_tora.md §4.5, §4.6).

Per clip (every frame decoded):

1. optical flow between consecutive frames at ``--flow-size`` (short side) with a pluggable backend: ``dis`` (OpenCV
   DIS, offline, the default) or ``raft`` (torchvision RAFT-Large from a local weights file, ``--raft-weights``);
2. the §4.5 filters that apply to any corpus, each a switch with its threshold:
   - ``--min-resolution`` (short side in pixels; the paper keeps >= 720p; 0 = off),
   - ``--min-flow-score`` (drop static clips; the paper keeps flow score > 3 with UniMatch; score = mean flow
     magnitude in pixels at the flow size),
   - ``--dramatic-keep`` (keep a clip with probability ``1 - flow_score / 100``, seeded per clip),
   - ``--camera-filter`` (background-motion estimate = the median flow vector of each frame pair; when its median
     magnitude exceeds ``--camera-min-motion`` px/frame, its angle must lie in the paper's bands
     [0,20] u [160,200] u [340,360] degrees (``--camera-bands``)),
   - ``--max-zoom`` (a zoom estimate: the mean radial flow per pixel of radius; off by default);
   the tool reports how many clips each filter removed;
3. sparse trajectories (§4.6, the port's sampler: grid at ``--stride`` with a random offset, sampled proportionally to
   the flow magnitude, 1..``--max-tracks`` tracks followed with the rounded flow), seeded per clip from ``--seed``.

Output shards hold every input member plus ``{key}.traj.npy`` (float32 ``[N, T, 2]``: x, y in pixels of the SOURCE
frames, one point per source frame) and, with ``--write-flow``, ``{key}.flow.npy`` (float16 ``[T-1, 2, h, w]`` at
``--stored-flow-size`` short side, in pixels of that size); the json gains a ``"motion"`` entry (backend, flow
score, camera estimate, track count, sizes). Both ``.npy`` are read without pickle. Unreadable samples are reported
and skipped. ``--workers`` processes decode and compute in parallel.

    vidgen trajectories --shards data/demo/train --out data/demo_traj/train --write-flow
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
CAMERA_BANDS = "0-20,160-200,340-360"


class TrajectoriesError(ValueError):
    """Bad options for `vidgen trajectories` (the message names the fix)."""


@dataclass(frozen=True)
class Options:
    backend: str = "dis"
    raft_weights: str | None = None
    flow_size: int = 320
    min_resolution: int = 0
    min_flow_score: float | None = 3.0
    dramatic_keep: bool = True
    camera_filter: bool = True
    camera_min_motion: float = 1.0
    camera_bands: tuple[tuple[float, float], ...] = ((0, 20), (160, 200), (340, 360))
    max_zoom: float | None = None
    max_tracks: int = 16
    stride: int = 32
    seed: int = 0
    write_flow: bool = False
    stored_flow_size: int = 64
    max_frames: int | None = None


def parse_bands(text: str) -> tuple[tuple[float, float], ...]:
    try:
        bands = tuple(tuple(float(v) for v in part.split("-")) for part in text.split(","))
    except ValueError:
        bands = ()
    if not bands or any(len(b) != 2 or not 0 <= b[0] <= b[1] <= 360 for b in bands):
        raise TrajectoriesError(f"--camera-bands {text!r}: give degree ranges like {CAMERA_BANDS!r}")
    return bands  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidgen trajectories", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="input shards: directory, brace pattern, glob or .tar")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--backend", choices=("dis", "raft"), default="dis", help="optical flow backend")
    p.add_argument("--raft-weights", default=None, help="local torchvision raft_large state dict (backend raft)")
    p.add_argument("--flow-size", type=int, default=320, help="short side the flow is computed at")
    p.add_argument("--max-frames", type=int, default=None, help="use at most this many frames of a clip")
    p.add_argument("--min-resolution", type=int, default=0, help="drop clips with a shorter short side (0: off)")
    p.add_argument("--min-flow-score", type=float, default=3.0, help="drop static clips (negative: off)")
    p.add_argument("--no-dramatic-keep", dest="dramatic_keep", action="store_false",
                   help="keep every clip instead of keeping one with probability 1 - flow_score/100")
    p.add_argument("--no-camera-filter", dest="camera_filter", action="store_false")
    p.add_argument("--camera-min-motion", type=float, default=1.0,
                   help="background motion (px/frame at the flow size) above which the angle bands apply")
    p.add_argument("--camera-bands", default=CAMERA_BANDS, help="allowed background-motion angles in degrees")
    p.add_argument("--max-zoom", type=float, default=None, help="drop clips whose zoom estimate exceeds this")
    p.add_argument("--max-tracks", type=int, default=16, help="N: tracks per clip are uniform in 1..N")
    p.add_argument("--stride", type=int, default=32, help="grid stride of the track candidates (source pixels)")
    p.add_argument("--write-flow", action="store_true", help="also store the dense flow (flow.npy)")
    p.add_argument("--stored-flow-size", type=int, default=64, help="short side of the stored flow")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing output shards")
    p.add_argument("--no-progress", action="store_true")
    return p


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def read_frames(data: bytes, max_frames: int | None = None) -> np.ndarray:
    """Every frame of a video as uint8 ``[T, H, W, 3]`` (PyAV)."""
    import av

    frames = []
    with av.open(io.BytesIO(data)) as container:
        for f in container.decode(container.streams.video[0]):
            frames.append(f.to_ndarray(format="rgb24"))
            if max_frames and len(frames) >= max_frames:
                break
    if len(frames) < 2:
        raise ValueError(f"{len(frames)} decodable frame(s); need at least 2")
    return np.stack(frames)


def _resize(frames: np.ndarray, short: int) -> tuple[np.ndarray, float]:
    import cv2

    h, w = frames.shape[1:3]
    s = short / min(h, w)
    if abs(s - 1) < 1e-6:
        return frames, 1.0
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]), s


def resize_flow(flow: np.ndarray, short: int) -> np.ndarray:
    """``[T, 2, h, w]`` flow -> the given short side, displacements rescaled with the frame."""
    import cv2

    h, w = flow.shape[-2:]
    s = short / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    out = np.stack([np.stack([cv2.resize(f[c], size, interpolation=cv2.INTER_AREA) for c in range(2)]) for f in flow])
    out[:, 0] *= size[0] / w
    out[:, 1] *= size[1] / h
    return out


def camera_motion(flow: np.ndarray) -> dict:
    """Background-motion estimate: per frame pair the median flow vector (the background dominates the frame); its
    median over the clip gives magnitude (px/frame) and angle (degrees, counter-clockwise from +x with y up)."""
    med = np.median(flow.reshape(flow.shape[0], 2, -1), axis=-1)  # [T-1, 2]
    v = np.median(med, axis=0)
    h, w = flow.shape[-2:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rx, ry = xx - (w - 1) / 2, yy - (h - 1) / 2
    r2 = rx**2 + ry**2
    zoom = float(np.mean([(f[0] * rx + f[1] * ry).sum() / r2.sum() for f in flow]))  # radial flow per px of radius
    return {"dx": float(v[0]), "dy": float(v[1]), "magnitude": float(np.hypot(*v)),
            "angle": float(math.degrees(math.atan2(-v[1], v[0])) % 360.0), "zoom": zoom}


def process(key: str, members: dict[str, bytes], opts: Options) -> tuple[str, dict | None, str | None, dict]:
    """One sample -> (key, output members or None, reason it was dropped, info)."""
    from vidgen.lightning_modules.nn.trajectory import optical_flow, sample_sparse_trajectories

    ext = next((e for e in VIDEO_EXTS if e in members), None)
    if ext is None:
        return key, None, "no_video", {}
    try:
        frames = read_frames(members[ext], opts.max_frames)
    except Exception as e:  # noqa: BLE001 - any decoder failure: report and skip
        return key, None, "unreadable", {"error": f"{type(e).__name__}: {e}"[:200]}
    src_h, src_w = frames.shape[1:3]
    info = {"source_size": [src_h, src_w], "frames": len(frames)}
    if opts.min_resolution and min(src_h, src_w) < opts.min_resolution:
        return key, None, "resolution", info
    small, scale = _resize(frames, opts.flow_size)
    try:
        flow = optical_flow(small, opts.backend, opts.raft_weights)
    except Exception as e:  # noqa: BLE001
        return key, None, "flow_failed", {**info, "error": f"{type(e).__name__}: {e}"[:200]}
    score = float(np.hypot(flow[:, 0], flow[:, 1]).mean())
    cam = camera_motion(flow)
    info.update(flow_score=round(score, 4), camera=cam, flow_size=list(flow.shape[-2:]), backend=opts.backend)
    rng = np.random.default_rng([opts.seed, zlib.crc32(key.encode())])
    if opts.min_flow_score is not None and opts.min_flow_score >= 0 and score < opts.min_flow_score:
        return key, None, "static", info
    if opts.dramatic_keep and rng.random() >= max(0.0, 1.0 - score / 100.0):
        return key, None, "dramatic", info
    if opts.camera_filter and cam["magnitude"] > opts.camera_min_motion and not any(
            lo <= cam["angle"] <= hi for lo, hi in opts.camera_bands):
        return key, None, "camera", info
    if opts.max_zoom is not None and abs(cam["zoom"]) > opts.max_zoom:
        return key, None, "zoom", info
    # tracks at the flow size, stride scaled with it, then back to source pixels
    stride = max(1, round(opts.stride * scale))
    tracks = sample_sparse_trajectories(flow, rng, opts.max_tracks, stride)
    tracks = tracks / np.array([small.shape[2] / src_w, small.shape[1] / src_h], np.float32)
    info["num_tracks"] = int(tracks.shape[0])
    out = dict(members)
    out["traj.npy"] = _npy(tracks.astype(np.float32))
    if opts.write_flow:
        out["flow.npy"] = _npy(resize_flow(flow, opts.stored_flow_size).astype(np.float16))
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    meta["motion"] = info
    out["json"] = json.dumps(meta, sort_keys=True).encode()
    return key, out, None, info


def _process_star(args):
    return process(*args)


def _samples(urls: list[str], counters: dict):
    from vidgen.datamodules.tario import iter_stream

    for url in urls:
        try:
            for key, members in iter_stream(url):
                yield key, members
        except Exception as e:  # noqa: BLE001 - a broken shard: report, go on with the next
            counters["unreadable_shard"] = counters.get("unreadable_shard", 0) + 1
            print(f"vidgen trajectories: cannot read {url}: {type(e).__name__}: {e}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    from vidgen.datamodules.tario import expand_shards, make_index, write_index
    from vidgen.shards import ShardWriter

    for name in ("flow_size", "max_tracks", "stride", "workers", "samples_per_shard", "stored_flow_size"):
        if getattr(args, name) < 1:
            raise TrajectoriesError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.backend == "raft" and (not args.raft_weights or not os.path.isfile(args.raft_weights)):
        raise TrajectoriesError("--backend raft needs --raft-weights: a local torchvision raft_large state dict file "
                                "(weights are never downloaded); or use --backend dis")
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise TrajectoriesError("vidgen trajectories needs OpenCV: pip install opencv-python-headless") from None
    opts = Options(backend=args.backend, raft_weights=args.raft_weights, flow_size=args.flow_size,
                   min_resolution=args.min_resolution,
                   min_flow_score=args.min_flow_score if args.min_flow_score >= 0 else None,
                   dramatic_keep=args.dramatic_keep, camera_filter=args.camera_filter,
                   camera_min_motion=args.camera_min_motion, camera_bands=parse_bands(args.camera_bands),
                   max_zoom=args.max_zoom, max_tracks=args.max_tracks, stride=args.stride, seed=args.seed,
                   write_flow=args.write_flow, stored_flow_size=args.stored_flow_size, max_frames=args.max_frames)
    urls = expand_shards(args.shards, what="--shards")
    os.makedirs(args.out, exist_ok=True)
    old = [f for f in os.listdir(args.out) if f.endswith(".tar")]
    if old and not args.overwrite:
        raise TrajectoriesError(f"{args.out} already holds {len(old)} shard(s); pass --overwrite or pick another --out")
    for f in old:
        os.remove(os.path.join(args.out, f))

    from tqdm import tqdm

    counters: dict[str, int] = {}
    writer = ShardWriter(args.out, "traj", max_samples=args.samples_per_shard)
    t0, kept, seen = time.perf_counter(), 0, 0
    jobs = ((k, m, opts) for k, m in _samples(urls, counters))
    pool = None
    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.workers)
        results = pool.imap(_process_star, jobs, chunksize=1)
    else:
        results = (process(*j) for j in jobs)
    try:
        for key, out, reason, info in tqdm(results, desc="trajectories", unit="clip", disable=args.no_progress):
            seen += 1
            if out is None:
                counters[reason] = counters.get(reason, 0) + 1
                if reason in ("unreadable", "flow_failed", "no_video"):
                    print(f"vidgen trajectories: skipped {key}: {reason} {info.get('error', '')}", file=sys.stderr)
                continue
            writer.write(key, out)
            kept += 1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    shards = writer.close()
    index = make_index(shards, skipped=[{"reason": k, "count": v} for k, v in sorted(counters.items())],
                       motion={"backend": opts.backend, "flow_size": opts.flow_size, "max_tracks": opts.max_tracks,
                               "stride": opts.stride, "seed": opts.seed, "write_flow": opts.write_flow})
    write_index(args.out, index)
    dt = time.perf_counter() - t0
    removed = ", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "none"
    print(f"vidgen trajectories: {seen} clips read, {kept} kept -> {len(shards)} shard(s) in {args.out} "
          f"({seen / max(dt, 1e-9):.1f} clips/s); removed: {removed}")
    return {"seen": seen, "kept": kept, "removed": counters}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except TrajectoriesError as e:
        print(f"vidgen trajectories: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
