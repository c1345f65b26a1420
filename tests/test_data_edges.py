"""Data edge cases of issue 9: a tar cut inside a member, decord's binary on stderr, shard entries that match
nothing."""

import os
import subprocess
import sys
import tarfile

import pytest

from vidgen import shards as shards_tool
from vidgen.datamodules import DataConfigError, VideoDataModule, tario
from shardgen import write_shards


def _cut_inside_first_member_of(tmp_path, key: str) -> str:
    """A 4-sample shard cut inside the data of ``key``'s first member (its video): every sample before is complete."""
    write_shards(str(tmp_path), 1, 4, frames=6, index=False)
    url = str(tmp_path / "shard-000000.tar")
    with tarfile.open(url) as tf:
        m = next(m for m in tf.getmembers() if m.name.startswith(key + "."))
    with open(url, "r+b") as f:
        f.truncate(m.offset_data + 10)
    return url


def test_tar_cut_inside_a_member_keeps_every_complete_sample(tmp_path, capsys):
    url = _cut_inside_first_member_of(tmp_path, "000002")
    lst = tario.scan_local(url)
    assert [s.key for s in lst.samples] == ["000000", "000001"]  # before the fix: 000001 was dropped too
    assert lst.truncated and lst.incomplete == 1
    # the datamodule reads both complete samples and counts the cut one as bad
    dm = VideoDataModule(train_shards=url, seed=0, num_frames=4, resolution=16, batch_size=1, num_workers=0,
                         shuffle=False, max_bad_fraction=1.0)
    with pytest.warns(UserWarning, match="index.json"):
        dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert keys == ["shard-000000.tar/000000", "shard-000000.tar/000001"]
    c = dm.data_counters()
    assert c["truncated"] == 1 and c["bad"] == 1 and c["ok"] == 2
    # vidgen shards --reindex counts the complete samples and reports the cut one
    assert shards_tool.main(["--reindex", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    entry = tario.read_index(url)["shards"]["shard-000000.tar"]
    assert entry["num_samples"] == 2 and entry["truncated"] and entry["incomplete_samples"] == 1
    assert "1 cut sample(s) counted as bad" in out


def test_tar_cut_inside_a_header_or_between_samples(tmp_path):
    write_shards(str(tmp_path), 1, 4, frames=6, index=False)
    url = str(tmp_path / "shard-000000.tar")
    data = open(url, "rb").read()
    with tarfile.open(url) as tf:
        members = tf.getmembers()
    start2 = next(m for m in members if m.name == "000002.mp4").offset
    json2 = next(m for m in members if m.name == "000002.json").offset
    cases = {start2 + 50: (["000000", "000001"], 1),  # header of sample 2's video cut: sample 2 is bad
             start2: (["000000", "000001"], 0),  # cut exactly between samples: nothing is bad
             json2 + 300: (["000000", "000001"], 1)}  # sample 2 lost its metadata: dropped and counted
    for cut, (keys, bad) in cases.items():
        with open(url, "wb") as f:
            f.write(data[:cut])
        lst = tario.scan_local(url)
        assert ([s.key for s in lst.samples], lst.incomplete, lst.truncated) == (keys, bad, True), cut


def test_corrupt_video_does_not_spray_binary_on_stderr(tmp_path):
    pytest.importorskip("decord")
    code = (
        "from vidgen.datamodules.decode import ClipSpec, SkipSample, decode_sample\n"
        "spec = ClipSpec(num_frames=4, height=16, width=16, backend='decord')\n"
        "try:\n"
        "    decode_sample('k', {'webm': b'\\x1aE\\xdf\\xa3' + bytes(range(1, 256)) * 3}, spec, None)\n"
        "except SkipSample as e:\n"
        "    print(e.reason, '|', e.detail)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    assert p.stderr == b"", p.stderr[:300]  # before the fix: decord printed the video's raw bytes here
    reason, detail = p.stdout.decode().strip().split(" | ", 1)
    assert reason == "corrupt" and "Invalid data found when processing input" in detail
    assert detail.isprintable()


def test_every_shard_entry_must_match(tmp_path):
    good = tmp_path / "good"
    write_shards(str(good), 1, 2, frames=6)
    with pytest.raises(DataConfigError, match=r"data.train_shards\[1\]: pattern '.*typo/\*.tar' matches no files"):
        VideoDataModule(train_shards=[str(good), str(tmp_path / "typo/*.tar")], seed=0)
    with pytest.raises(DataConfigError, match=r"data.sources\[0\].shards\[1\]"):
        VideoDataModule(sources=[{"shards": [str(good), str(tmp_path / "x-*.tar")]}], seed=0)
