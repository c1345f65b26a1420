"""Exact mid-epoch resume under Lightning: a run killed by a real SIGTERM at step k and resumed with
``--ckpt_path last`` consumes exactly the sample keys of an uninterrupted run, on 1 and 2 ranks."""

import os

import pytest

from cliutil import probe_config, run_cli
from lightning_modules.stream_probe import StreamProbe
from shardgen import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("rshards")
    write_shards(str(d), n_shards=4, per_shard=5, frames=12)
    return str(d)


def _run_pair(tmp_path, shards, *, total, k, workers, devices, strategy=None):
    full_log, part_log = str(tmp_path / "full.keys"), str(tmp_path / "part.keys")
    probe_config(tmp_path / "full.yaml", shards, steps=total, workers=workers, devices=devices, keys_log=full_log,
                 strategy=strategy)
    run_cli(["fit", "--config", "full.yaml", "--name", "full"], cwd=tmp_path)
    killer = [{"class_path": "killer.SignalAtStep", "init_args": {"step": k}}]
    probe_config(tmp_path / "part.yaml", shards, steps=total, workers=workers, devices=devices, keys_log=part_log,
                 callbacks=killer, strategy=strategy)
    p = run_cli(["fit", "--config", "part.yaml", "--name", "part"], cwd=tmp_path)
    assert "preempted: saved" in p.stdout, p.stdout[-2000:]
    assert os.path.exists(tmp_path / "runs/part/checkpoints/last.ckpt")
    for r in range(devices):
        assert len(StreamProbe.read_keys(part_log, r)) == k, "the preempted run must stop right after step k"
    probe_config(tmp_path / "resume.yaml", shards, steps=total, workers=workers, devices=devices, keys_log=part_log,
                 strategy=strategy)
    p = run_cli(["fit", "--config", "resume.yaml", "--name", "part", "--ckpt_path", "last"], cwd=tmp_path)
    assert "resuming from" in p.stdout
    for r in range(devices):
        full, resumed = StreamProbe.read_keys(full_log, r), StreamProbe.read_keys(part_log, r)
        assert len(full) == total
        assert resumed == full, f"rank {r}: resumed stream differs"


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_resume_is_exact(tmp_path, shards, workers):
    # 4 shards x 5 samples, batch 2 -> 10 batches per epoch; k=7 is mid-epoch, total=13 crosses an epoch
    _run_pair(tmp_path, shards, total=13, k=7, workers=workers, devices=1)


@pytest.mark.distributed
def test_two_rank_ddp_resume_is_exact(tmp_path, shards):
    # only rank 0 is signalled: the flag is combined over ranks, both stop at the same step
    _run_pair(tmp_path, shards, total=8, k=3, workers=1, devices=2, strategy="ddp")
