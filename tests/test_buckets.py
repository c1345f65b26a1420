"""Open-Sora bucket config (spec latte_tora.md §3.3) on the datamodule: assignment rule, per-bucket batch sizes,
exact resume."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

from shardgen import add, encode_mp4, encode_png, ramp_video
from vidgen.datamodules import DataConfigError, VideoDataModule
from vidgen.datamodules.buckets import BucketConfig

CONFIG = {
    "32": {1: [1.0, 4], 8: [1.0, 2], 4: [[1.0, 1.0], 3]},
    "16": {1: [1.0, 5], 4: [1.0, 3]},
}


def test_assignment_follows_open_sora_rule():
    b = BucketConfig(CONFIG)
    assign = lambda t, h, w, k=0: b.assign(t, h, w, seed=(0, k))  # noqa: E731
    got = assign(1, 40, 40)
    assert (got.resolution, got.frames, got.height, got.width, got.batch_size) == ("32", 1, 32, 32, 4)
    assert (assign(12, 32, 32).frames, assign(12, 32, 32).batch_size) == (8, 2)  # longest t with T > t
    assert assign(8, 32, 32).frames == 4  # T > t is strict
    assert assign(4, 32, 32) is None  # no frame bucket t with 4 > t at any resolution (t = 1 is for images)
    small = assign(12, 16, 20)  # 320 px < 0.8 * 1024: only 16 x 16 is eligible
    assert (small.resolution, small.frames, small.height) == ("16", 4, 16)
    assert assign(12, 8, 8) is None  # smaller than every resolution: dropped
    # keep probabilities and frame gates are random but reproducible per sample
    gated = BucketConfig({"32": {8: [[1.0, 0.3], 2], 4: [0.5, 3]}})
    picks = [gated.assign(12, 32, 32, seed=(1, k)) for k in range(2000)]
    n8 = sum(p is not None and p.frames == 8 for p in picks)
    n4 = sum(p is not None and p.frames == 4 for p in picks)
    assert abs(n8 / 2000 - 0.3) < 0.04 and abs(n4 / 2000 - 0.7 * 0.5) < 0.04
    assert [gated.assign(12, 32, 32, seed=(1, k)) for k in range(50)] == picks[:50]
    with pytest.raises(ValueError, match="unknown"):
        BucketConfig({"33p": {1: [1.0, 2]}})


def _write(out_dir: str) -> str:
    """Videos of two sizes and lengths plus images, with the json size metadata Open-Sora's buckets need."""
    os.makedirs(out_dir, exist_ok=True)
    k = 0
    for s in range(2):
        with tarfile.open(os.path.join(out_dir, f"b-{s:06d}.tar"), "w") as tf:
            for _ in range(10):
                key = f"{k:06d}"
                kind = k % 3
                if kind == 0:
                    h, w, n = 32, 32, 12
                    add(tf, key + ".mp4", encode_mp4(ramp_video(n, h, w, seed=k)))
                elif kind == 1:
                    h, w, n = 16, 24, 6
                    add(tf, key + ".mp4", encode_mp4(ramp_video(n, h, w, seed=k)))
                else:
                    h, w, n = 40, 40, 1
                    add(tf, key + ".png", encode_png(ramp_video(1, h, w, seed=k)[0]))
                add(tf, key + ".txt", f"sample {k}".encode())
                add(tf, key + ".json", json.dumps({"fps": 8, "height": h, "width": w, "num_frames": n}).encode())
                k += 1
    return out_dir


def test_datamodule_buckets_shapes_batch_sizes_and_exact_resume(tmp_path):
    shards = _write(str(tmp_path / "s"))

    def make():
        dm = VideoDataModule(train_shards=shards, seed=1, num_frames=4, resolution=16, batch_size=2, num_workers=0,
                             bucket_config=CONFIG)
        dm.setup("fit")
        return dm

    def take(dm, n):
        out = []
        while len(out) < n:
            for batch in dm.train_dataloader():
                out.append((tuple(batch["video"].shape), tuple(batch["key"]), batch["video"], batch["fps"]))
                if len(out) == n:
                    break
        return out

    full = take(make(), 12)
    shapes = {x[0] for x in full}
    assert shapes <= {(2, 3, 8, 32, 32), (3, 3, 4, 16, 16), (4, 3, 1, 32, 32)}, shapes
    assert len(shapes) == 3  # every bucket occurs, each with its own batch size
    dm = make()
    first = take(dm, 7)
    state = dm.state_dict()
    assert any(w["pending"] for w in state["ranks"][0]["workers"].values())  # samples held in part-filled buckets
    dm2 = make()
    dm2.load_state_dict(state)
    resumed = first + take(dm2, 5)  # across the epoch end; held samples re-read into the same buckets
    assert [x[:2] for x in resumed] == [x[:2] for x in full]
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) for a, b in zip(resumed, full)), \
        "same keys, but the resumed clips (crops, offsets, flips) differ"


def test_bucket_config_errors_are_data_errors(tmp_path):
    shards = _write(str(tmp_path / "s"))
    with pytest.raises(DataConfigError, match="batch size"):
        VideoDataModule(train_shards=shards, seed=0, bucket_config={"32": {4: [1.0, None]}})
