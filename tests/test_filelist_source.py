"""Files plus a CSV (Open-Sora's layout) read directly as a data source (#11 §6): the same samples as the tar shards
`vidgen shards` packs from that CSV, the same exact mid-epoch resume, bad rows as one config error before any work,
corrupt or vanished files skipped and counted."""

import json
import os

import pytest
import torch

from shardgen import ramp_video
from vidgen import shards
from vidgen.datamodules import DataConfigError, VideoDataModule, filelist, media, tario

CLASSES = ["circle", "square", "circle", "square", "circle", "square", "circle"]


def _write_files(root):
    """Six tiny videos (12 frames, 24x32, 8 fps) and one image; every sample's pixels differ."""
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    rows = []
    for i in range(6):
        path = os.path.join("clips", f"v{i}.mp4")
        with open(os.path.join(root, path), "wb") as f:
            f.write(media.encode_video(ramp_video(12, seed=i), 8, layout="thwc"))
        rows.append((path, f"a clip number {i}", 12, 24, 32, 8.0))
    img = os.path.join(root, "still.png")  # an absolute path; mixed image/video: held samples across batches
    with open(img, "wb") as f:
        f.write(media.encode_image(ramp_video(1, seed=9)[0], "png"))
    rows.append((img, "a still", 1, 24, 32, ""))
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("filelist"))
    rows = _write_files(root)
    csv = os.path.join(root, "train.csv")
    with open(csv, "w") as f:  # Open-Sora's column names, plus a label column of class names
        f.write("path,text,num_frames,height,width,fps,aspect_ratio,label\n")
        for (p, text, n, h, w, fps), c in zip(rows, CLASSES):
            f.write(f"{p},{text},{n},{h},{w},{fps},{h / w},{c}\n")
    out = os.path.join(root, "shards")
    assert shards.main([csv, out, "--workers", "1", "--no-progress"]) == 0
    return csv, out


def make(src, **kw):
    args = dict(train_shards=src, seed=5, num_frames=4, frame_stride=2, resolution=16, batch_size=2, num_workers=0)
    args.update(kw)
    dm = VideoDataModule(**args)
    dm.setup("fit")
    return dm


def stream(dm, n):
    """The next ``n`` batches as (key without the shard name, text, label, video) tuples, across epochs."""
    out = []
    while len(out) < n:
        for b in dm.train_dataloader():
            out.append(([k.split("/", 1)[1] for k in b["key"]], b["text"], b["label"].tolist(), b["video"]))
            if len(out) == n:
                break
    return out


def same(a, b):
    return len(a) == len(b) and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_csv_streams_the_samples_of_its_tar_shards_and_resumes_exactly(data, num_workers):
    csv, tars = data
    n = len(make(csv).train_dataloader())
    assert n == 3  # 7 rows / batch 2
    total = 2 * n + 1  # two epochs and a bit: the second pass's order too
    from_csv = stream(make(csv, num_workers=num_workers), total)
    assert same(from_csv, stream(make(tars, num_workers=num_workers), total))
    assert not same(from_csv, stream(make(csv, num_workers=num_workers, seed=6), total))
    labels = {k: lab for keys, _, labs, _ in from_csv for k, lab in zip(keys, labs)}
    assert labels["000000_v0"] == 0 and labels["000001_v1"] == 1  # class names -> sorted ids, as `vidgen shards`
    assert any(v.shape[2] == 1 for *_, v in from_csv)  # the still came through as T=1

    k = 2  # mid-epoch
    dm = make(csv, num_workers=num_workers)
    first = stream(dm, k)
    state = dm.state_dict()
    dm2 = make(csv, num_workers=num_workers)
    dm2.load_state_dict(state)
    assert same(first + stream(dm2, total - k), from_csv)


def test_bad_rows_are_one_config_error_before_any_work(tmp_path):
    (tmp_path / "a.mp4").write_bytes(media.encode_video(ramp_video(6), 8, layout="thwc"))
    (tmp_path / "nopath.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(DataConfigError, match=r"data.train_shards: .*nopath.csv: the CSV needs a header with a 'path'"):
        VideoDataModule(train_shards=str(tmp_path / "nopath.csv"), seed=0)
    (tmp_path / "missing.csv").write_text("path,text\na.mp4,x\ngone.mp4,y\n")
    with pytest.raises(DataConfigError, match=r"data.val_shards: .*1 listed file\(s\) do not exist, e.g. .*missing.csv:3 "
                                              r"-> .*gone.mp4.* relative to the list's folder"):
        VideoDataModule(val_shards=str(tmp_path / "missing.csv"), seed=0)
    (tmp_path / "nolabels.csv").write_text("path,text\na.mp4,x\n")
    with pytest.raises(DataConfigError, match="require_labels.*hold no labels"):
        VideoDataModule(train_shards=str(tmp_path / "nolabels.csv"), seed=0, require_labels=True)
    # a classes.json beside the list fixes the ids (the train split's map, so another split's ids agree)
    (tmp_path / "named.csv").write_text("path,label\na.mp4,zebra\n")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["ant", "zebra"]}))
    assert tario.list_listing(str(tmp_path / "named.csv")).samples[0].inline["cls"] == b"1"


def test_corrupt_and_vanished_files_are_skipped_and_counted(tmp_path):
    for i in range(4):
        (tmp_path / f"v{i}.mp4").write_bytes(media.encode_video(ramp_video(8, seed=i), 8, layout="thwc"))
    (tmp_path / "bad.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "list.csv").write_text("path,text\n" + "".join(f"{n}.mp4,c{n}\n" for n in ("v0", "bad", "v1", "v2", "v3")))
    dm = make(str(tmp_path / "list.csv"), num_frames=2, shuffle=False, max_bad_fraction=0.5, bad_min_samples=100)
    os.remove(tmp_path / "v3.mp4")  # gone after the config check: that sample is skipped, the list goes on
    keys = [k for keys, *_ in stream(dm, 2) for k in keys]
    assert keys == ["000000_v0", "000002_v1", "000003_v2", "000000_v0"]  # row order; the next pass starts over
    counts = dm.data_counters()
    assert (counts["seen"], counts["ok"], counts["corrupt"], counts["unreadable"]) == (6, 4, 1, 1), counts
    assert filelist.sample_key(3, "/x/v2 final.mp4") == "000003_v2_final"
