"""Exact mid-epoch resume under Lightning: a run killed by a real SIGTERM at step k and resumed with
``--ckpt_path last`` consumes exactly the samples of an uninterrupted run (their keys, and the content hash of each
step's video: the same crops, offsets and flips), on 1 and 2 ranks."""

import os

import pytest

from cliutil import probe_config, run_cli
from vidgen.lightning_modules.stream_probe import StreamProbe
from shardgen import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("rshards")
    write_shards(str(d), n_shards=4, per_shard=5, frames=16)
    return str(d)


def _run_pair(tmp_path, shards, *, total, k, workers, devices, strategy=None, extra_callbacks=(), **cfg):
    full_log, part_log = str(tmp_path / "full.keys"), str(tmp_path / "part.keys")
    probe_config(tmp_path / "full.yaml", shards, steps=total, workers=workers, devices=devices, keys_log=full_log,
                 strategy=strategy, callbacks=list(extra_callbacks), **cfg)
    run_cli(["fit", "--config", "full.yaml", "--name", "full"], cwd=tmp_path)
    killer = [{"class_path": "killer.SignalAtStep", "init_args": {"step": k}}, *extra_callbacks]
    probe_config(tmp_path / "part.yaml", shards, steps=total, workers=workers, devices=devices, keys_log=part_log,
                 callbacks=killer, strategy=strategy, **cfg)
    p = run_cli(["fit", "--config", "part.yaml", "--name", "part"], cwd=tmp_path)
    assert "preempted: saved" in p.stdout, p.stdout[-2000:]
    assert os.path.exists(tmp_path / "runs/part/checkpoints/last.ckpt")
    assert not any(f.startswith("last-v") for f in os.listdir(tmp_path / "runs/part/checkpoints"))
    for r in range(devices):
        assert len(StreamProbe.read_keys(part_log, r)) == k, "the preempted run must stop right after step k"
    probe_config(tmp_path / "resume.yaml", shards, steps=total, workers=workers, devices=devices, keys_log=part_log,
                 strategy=strategy, callbacks=list(extra_callbacks), **cfg)
    p = run_cli(["fit", "--config", "resume.yaml", "--name", "part", "--ckpt_path", "last"], cwd=tmp_path)
    assert "resuming from" in p.stdout
    assert sorted(f for f in os.listdir(tmp_path / "runs/part/checkpoints") if f.startswith("last")) == ["last.ckpt"]
    for r in range(devices):
        full, resumed = StreamProbe.read_keys(full_log, r), StreamProbe.read_keys(part_log, r)
        assert len(full) == total
        assert resumed == full, f"rank {r}: resumed stream differs"
        full_v, resumed_v = StreamProbe.read_video_hashes(full_log, r), StreamProbe.read_video_hashes(part_log, r)
        assert len(full_v) == total and resumed_v == full_v, f"rank {r}: same keys but the resumed videos differ"


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_resume_is_exact(tmp_path, shards, workers):
    # 4 shards x 5 samples, batch 2 -> 10 batches per epoch; k=7 is mid-epoch, total=13 crosses an epoch
    _run_pair(tmp_path, shards, total=13, k=7, workers=workers, devices=1)


@pytest.mark.distributed
def test_two_rank_ddp_resume_is_exact(tmp_path, shards):
    # only rank 0 is signalled: the flag is combined over ranks, both stop at the same step
    _run_pair(tmp_path, shards, total=8, k=3, workers=1, devices=2, strategy="ddp")


@pytest.mark.distributed
def test_two_rank_fsdp2_callbacks_and_resume_are_exact(tmp_path, shards):
    """FSDP2 (sharded DCP checkpoints) with every suite callback on — EMA, a curriculum stage that changes the clip
    resolution, freezes the decoder and scales the LR after the resume point, the sample logger, the throughput
    monitor and FVD — killed at step 3 and resumed: the same data stream per rank, the same final raw and EMA
    weights, and every callback produced its output in both runs."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_fvd import FakeDetector

    det = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(FakeDetector()).save(str(det))
    fsdp = {"class_path": "vidgen.parallel.FSDP2Strategy", "init_args": {"save_distributed_checkpoint": True}}
    callbacks = [
        {"class_path": "vidgen.callbacks.ema.EMA", "init_args": {"decay": 0.9, "warmup_steps": 2}},
        {"class_path": "vidgen.callbacks.curriculum.StagedCurriculum", "init_args": {"stages": [
            {"at_step": 0}, {"at_step": 5, "resolution": 8, "frozen": ["dec\\..*"], "lr_scale": 0.5}]}},
        {"class_path": "vidgen.callbacks.samples.VideoSampleLogger", "init_args": {"every_n_steps": 4, "num_samples": 2}},
        {"class_path": "vidgen.callbacks.throughput.VideoThroughputMonitor"},
        {"class_path": "vidgen.callbacks.fvd.FVDCallback", "init_args": {
            "every_n_steps": 4, "num_samples": 4, "batch_size": 2, "real_shards": shards, "i3d_path": str(det),
            "cache_dir": str(tmp_path / "fvdcache")}},
    ]
    _run_pair(tmp_path, shards, total=8, k=3, workers=1, devices=2, strategy=fsdp, extra_callbacks=callbacks,
              val_shards=shards, num_frames=16, extra_trainer={"limit_val_batches": 2})
    weights = {}
    for run in ("full", "part"):
        for kind in ("raw", "ema"):
            out = tmp_path / f"{run}_{kind}.pt"
            args = ["export", str(tmp_path / "runs" / run / "checkpoints" / "last.ckpt"), str(out)]
            run_cli(args + (["--ema"] if kind == "ema" else []), cwd=tmp_path)
            w = torch.load(out)
            weights[run, kind] = w.get("state_dict", w)
        samples = sorted(os.listdir(tmp_path / "runs" / run / "samples"))
        assert "step00000004.png" in samples and "step00000008.mp4" in samples, samples
        ea = EventAccumulator(str(tmp_path / "runs" / run / "tb")).Reload()
        tags = set(ea.Tags()["scalars"])
        assert {"val/fvd", "perf/data_wait_fraction", "curriculum/stage"} <= tags, tags
        assert [e.value for e in ea.Scalars("curriculum/stage")][-1] == 1
    for kind in ("raw", "ema"):
        a, b = weights["full", kind], weights["part", kind]
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{kind} {name}")
    assert not all(torch.equal(weights["full", "raw"][n], weights["full", "ema"][n]) for n in weights["full", "raw"])
