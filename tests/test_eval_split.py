"""Eval splits (val/test/predict): one pass, every clip exactly once in one process (the last batch partial); under
DDP every rank gets the same batches (count and sizes), the shorter rank's filled with repeats marked ``valid`` False."""

import collections

import pytest
import torch

from vidgen.datamodules import BadDataError, VideoDataModule
from shardgen import write_shards

N_SHARDS, PER_SHARD = 3, 7
ALL = [f"shard-{s:06d}.tar/{s * PER_SHARD + i:06d}" for s in range(N_SHARDS) for i in range(PER_SHARD)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("evshards")
    write_shards(str(d), n_shards=N_SHARDS, per_shard=PER_SHARD, frames=8)
    return str(d)


def make(shards, split="val", **kw):
    args = dict(seed=0, num_frames=4, resolution=16, batch_size=4, num_workers=0, **{f"{split}_shards": shards})
    args.update(kw)
    return VideoDataModule(**args)


def batches(dm, split="val"):
    loader = getattr(dm, f"{split}_dataloader")()
    out = list(loader)
    assert len(out) == len(loader), "the loader's length must be the batches it yields (Lightning stops at it)"
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_process_yields_every_clip_once(shards, num_workers):
    for bs in (4, 5, 64):
        for split in ("val", "test"):
            got = batches(make(shards, split, batch_size=bs, num_workers=num_workers), split)
            keys = [k for b in got for k in b["key"]]
            assert sorted(keys) == ALL, (bs, collections.Counter(keys).most_common(3))
            full, rest = divmod(len(ALL), bs)
            assert [len(b["key"]) for b in got] == [bs] * full + ([rest] if rest else [])
            assert all(b["valid"].dtype == torch.bool and b["valid"].all() for b in got)
            assert all(b["video"].shape[0] == len(b["key"]) == len(b["label"]) for b in got)


def _ranks(shards, world, **kw):
    return [batches(make(shards, rank=r, world_size=world, **kw)) for r in range(world)]


@pytest.mark.parametrize("num_workers,split_by", [(0, "auto"), (2, "auto"), (0, "shard")])
def test_two_ranks_same_batches_and_valid_union_is_every_clip_once(shards, num_workers, split_by):
    per_rank = _ranks(shards, 2, num_workers=num_workers, split_by=split_by)
    assert len(per_rank[0]) == len(per_rank[1]), "ranks must run the same number of eval steps (collectives)"
    assert [len(b["key"]) for b in per_rank[0]] == [len(b["key"]) for b in per_rank[1]]
    valid = [k for bl in per_rank for b in bl for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert sorted(valid) == ALL
    pads = 0
    for bl in per_rank:  # padding repeats this rank's own real clips, bit for bit
        real = {k: v for b in bl for k, v, ok in zip(b["key"], b["video"], b["valid"].tolist()) if ok}
        for b in bl:
            for k, v, ok in zip(b["key"], b["video"], b["valid"].tolist()):
                if not ok:
                    pads += 1
                    assert k in real and torch.equal(v, real[k])
    assert pads > 0
    if split_by == "shard":  # 14 vs 7 clips at batch 4: the short rank also gets batches of padding only
        assert any(not b["valid"].any() for b in per_rank[1])


def test_rank_env_and_a_rank_without_clips(tmp_path, shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    env = batches(make(shards))
    assert [b["key"] for b in env] == [b["key"] for b in _ranks(shards, 2)[1]]
    one = tmp_path / "one"
    write_shards(str(one), n_shards=1, per_shard=1, frames=8)
    r0, r1 = _ranks(str(one), 2)
    assert len(r0) == len(r1) == 1
    assert r0[0]["valid"].tolist() == [True] and r1[0]["valid"].tolist() == [False]
    assert r1[0]["key"] == r0[0]["key"] and torch.equal(r1[0]["video"], r0[0]["video"])


def test_undecodable_eval_clip_is_padding_and_mixed_shapes(tmp_path):
    bad = tmp_path / "bad"
    write_shards(str(bad), n_shards=1, per_shard=6, frames=8, corrupt={2})
    got = batches(make(str(bad)))
    assert [len(b["key"]) for b in got] == [4, 2]
    valid = [k for b in got for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert sorted(valid) == [f"shard-000000.tar/{i:06d}" for i in (0, 1, 3, 4, 5)]
    mixed = tmp_path / "mixed"  # a png at position 2: batch 0 holds 2 videos and a still
    write_shards(str(mixed), n_shards=1, per_shard=3, frames=8, images_every=3)
    got = list(make(str(mixed)).val_dataloader())  # a plain loop in one process: one batch per shape
    assert [tuple(b["video"].shape[:3]) for b in got] == [(2, 3, 4), (1, 3, 1)]
    assert sorted(k for b in got for k in b["key"]) == [f"shard-000000.tar/{i:06d}" for i in range(3)]
    with pytest.raises(BadDataError, match="mixes clip shapes.*image_frames=repeat"):
        batches(make(str(mixed), rank=0, world_size=2))  # under DDP the batch count must be known in advance
    assert sum(len(b["key"]) for b in batches(make(str(mixed), image_frames="repeat"))) == 3


def test_stream_probe_eval_loss_drops_padding():
    from vidgen.lightning_modules.stream_probe import StreamProbe

    torch.manual_seed(0)
    probe = StreamProbe(channels=4)
    video = torch.rand(3, 3, 2, 8, 8) * 2 - 1
    real, n = probe.eval_loss({"video": video[:2]})
    padded, m = probe.eval_loss({"video": video, "valid": torch.tensor([True, True, False])})
    assert n == m == 2 and torch.allclose(real, padded)
    none, k = probe.eval_loss({"video": video, "valid": torch.zeros(3, dtype=torch.bool)})
    assert k == 0 and torch.isfinite(none)  # an all-padding batch: a finite value of zero weight (nn.batches.eval_rows)
