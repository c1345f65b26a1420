"""Tiny synthetic shards for tests: real mp4/png bytes written with PyAV/PIL, stored with plain tarfile."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np


def encode_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    """uint8 [T,H,W,3] -> mp4 bytes (mpeg4, all intra so decoding is exact enough for tests)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"g": "1", "qscale": "2"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return buf.getvalue()


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def ramp_video(n: int, h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    """Frame t has brightness 10 + 8t, so decoded frame indices can be read back from the pixels."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 30, size=(1, h, w, 3))
    t = np.arange(n)[:, None, None, None]
    return np.clip(10 + 8 * t + base, 0, 255).astype(np.uint8)


def add(tf: tarfile.TarFile, name: str, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_shards(out_dir: str, n_shards: int, per_shard: int, *, frames: int = 12, prefix: str = "shard",
                 images_every: int = 0, corrupt: set[int] = frozenset(), caption: bool = True,
                 index: bool = True, seed: int = 0) -> list[str]:
    """Samples ``{i:06d}`` numbered over all shards; ``corrupt`` holds sample numbers whose video bytes are garbage."""
    os.makedirs(out_dir, exist_ok=True)
    urls, counts, k = [], {}, 0
    for s in range(n_shards):
        url = os.path.join(out_dir, f"{prefix}-{s:06d}.tar")
        with tarfile.open(url, "w") as tf:
            for _ in range(per_shard):
                key = f"{k:06d}"
                if images_every and k % images_every == images_every - 1:
                    add(tf, key + ".png", encode_png(ramp_video(1, seed=seed + k)[0]))
                elif k in corrupt:
                    add(tf, key + ".mp4", b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
                else:
                    add(tf, key + ".mp4", encode_mp4(ramp_video(frames, seed=seed + k)))
                if caption:
                    add(tf, key + ".txt", f"sample {k}".encode())
                add(tf, key + ".json", json.dumps({"label": k % 5, "fps": 8}).encode())
                k += 1
        urls.append(url)
        counts[os.path.basename(url)] = per_shard
    if index:
        with open(os.path.join(out_dir, "index.json"), "w") as f:
            json.dump({"format": "vidgen-shards/1", "num_samples": sum(counts.values()),
                       "shards": {u: {"num_samples": n, "bytes": 0} for u, n in counts.items()}}, f)
    return urls
