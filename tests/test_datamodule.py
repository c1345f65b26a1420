"""VideoDataModule: shapes, ranges, determinism, exact resume in a plain loop, bucketing, bad input."""

import os
import tarfile

import numpy as np
import pytest
import torch

from vidgen.datamodules import BadDataError, DataConfigError, VideoDataModule
from vidgen.datamodules import decode as decode_mod
from vidgen.datamodules import stream as stream_mod
from shardgen import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(str(d), n_shards=3, per_shard=6, frames=12)
    return str(d)


def make(shards, **kw):
    args = dict(train_shards=shards, seed=3, num_frames=4, frame_stride=2, resolution=16, batch_size=2, num_workers=0)
    args.update(kw)
    dm = VideoDataModule(**args)
    dm.setup("fit")
    return dm


def take(dm, n):
    """The next ``n`` batches as (keys, video, fps, label); the loader re-iterates across epochs like a trainer does."""
    out = []
    while len(out) < n:
        for b in dm.train_dataloader():
            out.append((tuple(b["key"]), b["video"], b["fps"], b["label"]))
            if len(out) == n:
                break
    return out


def same(a, b) -> bool:
    """The same samples: keys, and the decoded clips (crop, offset, flip), fps and labels bit for bit."""
    return len(a) == len(b) and all(x[0] == y[0] and all(torch.equal(u, v) for u, v in zip(x[1:], y[1:]))
                                    for x, y in zip(a, b))


def test_batch_contract(shards):
    dm = make(shards, val_shards=shards)
    b = next(iter(dm.train_dataloader()))
    assert b["video"].shape == (2, 3, 4, 16, 16) and b["video"].dtype == torch.float32
    assert -1.0 <= b["video"].min() and b["video"].max() <= 1.0
    assert b["label"].dtype == torch.long and b["fps"].tolist() == [4.0, 4.0]  # 8 fps / stride 2
    assert all(t.startswith("sample ") for t in b["text"]) and "_state" not in b
    v = next(iter(dm.val_dataloader()))
    assert v["video"].shape == (2, 3, 4, 16, 16) and v["valid"].tolist() == [True, True]


def test_frames_follow_stride_and_eval_is_deterministic(shards):
    # pixel brightness encodes the frame index (10 + 8 t), so the clip's spacing is visible in the decoded values
    dm = make(shards, val_shards=shards, frame_stride=3, resolution=16)
    b1 = next(iter(dm.val_dataloader()))
    b2 = next(iter(dm.val_dataloader()))
    assert torch.equal(b1["video"], b2["video"]) and b1["key"] == b2["key"]
    mean = ((b1["video"][0].mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()
    steps = np.diff(mean)
    assert np.allclose(steps, 24, atol=3), steps  # 3 frames apart x 8 levels per frame


def test_same_seed_same_stream_other_seed_differs(shards):
    a = take(make(shards), 6)
    b = take(make(shards), 6)
    c = take(make(shards, seed=4), 6)
    assert same(a, b) and not same(a, c)
    assert [x[0] for x in a] != [x[0] for x in c]


def test_epoch_covers_the_data(shards):
    """One worker sees every sample exactly once per epoch; with N workers each batches its own share, so at most
    N * batch_size samples can repeat (a worker whose share is not a multiple of the batch wraps around)."""
    for nw in (0, 2):
        dm = make(shards, num_workers=nw)
        keys = [k for batch in take(dm, len(dm.train_dataloader())) for k in batch[0]]
        assert len(keys) == 18
        assert len(set(keys)) >= 18 - (0 if nw == 0 else nw * 2), (nw, sorted(keys))


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_exact_resume_plain_loop(shards, num_workers, monkeypatch):
    total, k = 14, 5  # crosses the epoch boundary (9 batches per epoch)
    full = take(make(shards, num_workers=num_workers), total)
    dm = make(shards, num_workers=num_workers)
    first = take(dm, k)
    state = dm.state_dict()
    dm2 = make(shards, num_workers=num_workers)
    dm2.load_state_dict(state)
    if num_workers == 0:  # resuming decodes nothing before the cursor
        calls = []
        orig = stream_mod.decode_sample
        monkeypatch.setattr(stream_mod, "decode_sample", lambda *a, **kw: calls.append(a[0]) or orig(*a, **kw))
    rest = take(dm2, total - k)
    assert same(first + rest, full)
    if num_workers == 0:
        assert len(calls) == 2 * (total - k)


def test_mixed_images_and_videos_bucket_into_same_shape_batches(tmp_path):
    write_shards(str(tmp_path), n_shards=2, per_shard=9, frames=10, images_every=3)
    dm = VideoDataModule(train_shards=str(tmp_path), seed=0, num_frames=4, resolution=16, batch_size=3, num_workers=0)
    dm.setup("fit")
    shapes = {tuple(b["video"].shape) for b in dm.train_dataloader()}
    assert shapes == {(3, 3, 4, 16, 16), (3, 3, 1, 16, 16)}
    dm = VideoDataModule(train_shards=str(tmp_path), seed=0, num_frames=4, resolution=16, batch_size=3, num_workers=0,
                         image_frames="repeat")
    dm.setup("fit")
    assert {tuple(b["video"].shape) for b in dm.train_dataloader()} == {(3, 3, 4, 16, 16)}


def test_mixture_weights_and_stage_switch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(str(a), 2, 6, frames=10, prefix="a")
    write_shards(str(b), 2, 6, frames=10, prefix="b", seed=100)
    dm = VideoDataModule(sources=[{"shards": str(a), "weight": 1.0, "name": "a"},
                                  {"shards": str(b), "weight": 0.0, "name": "b"}],
                         seed=0, num_frames=4, resolution=16, batch_size=2, num_workers=2, resampled=True)
    dm.setup("fit")
    dm.set_stages([{"start_batch": 0}, {"start_batch": 6, "weights": [0.0, 1.0], "num_frames": 2}])
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(12)]
    assert all(k.startswith("a-") for x in batches[:6] for k in x["key"])
    assert all(k.startswith("b-") for x in batches[6:] for k in x["key"])
    assert batches[0]["video"].shape[2] == 4 and batches[-1]["video"].shape[2] == 2


def test_corrupt_samples_skipped_and_counted(tmp_path):
    write_shards(str(tmp_path), 2, 8, frames=10, corrupt={1, 9})
    dm = VideoDataModule(train_shards=str(tmp_path), seed=0, num_frames=4, resolution=16, batch_size=2,
                         num_workers=0, split_by="shard")
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert not any(k.endswith(("000001", "000009")) for k in keys)
    c = dm.data_counters()
    assert c["corrupt"] >= 2 and c["bad"] == c["corrupt"]


def test_truncated_tar_keeps_complete_samples(tmp_path):
    write_shards(str(tmp_path), 1, 8, frames=10, index=False)
    url = str(tmp_path / "shard-000000.tar")
    size = os.path.getsize(url)
    with open(url, "r+b") as f:
        f.truncate(size * 5 // 8)
    dm = VideoDataModule(train_shards=url, seed=0, num_frames=4, resolution=16, batch_size=1, num_workers=0)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="index.json"):
        dm2 = VideoDataModule(train_shards=url, seed=0, num_frames=4, resolution=16, batch_size=1, num_workers=0)
        dm2.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    with tarfile.open(url) as _:
        pass
    assert 2 <= len(set(keys)) < 8
    assert dm.data_counters()["truncated_shards"] >= 1


def test_mostly_broken_dataset_is_a_clear_error(tmp_path):
    write_shards(str(tmp_path), 1, 12, frames=10, corrupt=set(range(10)))
    dm = VideoDataModule(train_shards=str(tmp_path), seed=0, num_frames=4, resolution=16, batch_size=1,
                         num_workers=0, max_bad_fraction=0.5, bad_min_samples=6)
    dm.setup("fit")
    with pytest.raises(BadDataError, match=r"max_bad_fraction.*Examples: shard-000000.tar:0000"):
        list(dm.train_dataloader())


def test_missing_caption_skipped_when_text_required(tmp_path):
    write_shards(str(tmp_path), 1, 4, frames=10, caption=False)
    dm = VideoDataModule(train_shards=str(tmp_path), seed=0, num_frames=4, resolution=16, batch_size=1,
                         num_workers=0, require_text=True, max_bad_fraction=1.0)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    with pytest.raises(BadDataError, match="no usable samples.*missing_text"):
        next(it)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(DataConfigError, match="data.train_shards.*matches no files|do not exist"):
        VideoDataModule(train_shards=str(tmp_path / "nothing-{000..009}.tar"), seed=0)
    with pytest.raises(DataConfigError, match="data.crop='middle' is not one of"):
        VideoDataModule(train_shards=None, seed=0, crop="middle")
    with pytest.raises(DataConfigError, match="data.num_frames"):
        VideoDataModule(train_shards=None, seed=0, num_frames=0)


def test_token_and_latent_shards_pass_through(tmp_path):
    """Shards written by `vidgen tokenize` ({key}.npy, no media) give batch["tokens"] / batch["latents"]."""
    import io
    import json

    import numpy as np

    from shardgen import add

    url = tmp_path / "tokens-000000.tar"
    rng = np.random.default_rng(0)
    arrays = {}
    with tarfile.open(url, "w") as tf:
        for i in range(6):
            key = f"{i:06d}"
            arr = rng.integers(0, 1024, size=(2, 4, 4)).astype(np.int16) if i < 3 else \
                rng.standard_normal((4, 2, 4, 4)).astype(np.float16)
            arrays[f"tokens-000000.tar/{key}"] = arr
            buf = io.BytesIO()
            np.save(buf, arr)
            add(tf, key + ".npy", buf.getvalue())
            add(tf, key + ".cls", str(i).encode())
            add(tf, key + ".json", json.dumps({"fps": 8}).encode())
    dm = VideoDataModule(train_shards=str(url), seed=0, batch_size=3, num_workers=0, shuffle=False)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    kinds = {("tokens" if "tokens" in b else "latents") for b in batches}
    assert kinds == {"tokens", "latents"}
    for b in batches:
        name = "tokens" if "tokens" in b else "latents"
        assert "video" not in b and b[name].dtype == (torch.long if name == "tokens" else torch.float32)
        for k, x in zip(b["key"], b[name]):
            assert np.array_equal(x.numpy(), arrays[k].astype(x.numpy().dtype))


def test_plain_video_file_is_a_one_sample_source(tmp_path):
    """`--data.predict_shards clip.mp4`: a video file given where shards are expected (conditioning for predict)."""
    from shardgen import encode_mp4, ramp_video

    clip = tmp_path / "my_clip.mp4"
    clip.write_bytes(encode_mp4(ramp_video(12)))
    dm = VideoDataModule(predict_shards=str(clip), seed=0, num_frames=4, resolution=16, batch_size=1, num_workers=0)
    batches = list(dm.predict_dataloader())
    assert len(batches) == 1 and batches[0]["key"] == ["my_clip.mp4/my_clip"]
    assert batches[0]["video"].shape == (1, 3, 4, 16, 16)
