"""The two console scripts, run directories, config errors reported before any work."""

import os

import pytest
import yaml

from cliutil import probe_config, run_cli
from shardgen import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("cshards")
    write_shards(str(d), n_shards=2, per_shard=4, frames=10)
    return str(d)


@pytest.mark.parametrize("script", ["vidgen", "lightning"])
def test_fit_through_both_console_scripts(tmp_path, shards, script):
    probe_config(tmp_path / "p.yaml", shards, steps=3)
    p = run_cli(["fit", "--config", "p.yaml", "--checkpoint_every_n_steps", "2"], cwd=tmp_path, script=script)
    run = tmp_path / "runs" / "p"
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "checkpoints" / "step00000002.ckpt").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tb"))
    saved = yaml.safe_load(open(run / "config.yaml"))
    assert saved["model"]["class_path"] == "vidgen.lightning_modules.stream_probe.StreamProbe"
    # requeue: the same command again rewrites config.yaml instead of crashing, and resumes from last
    p = run_cli(["fit", "--config", "p.yaml", "--ckpt_path", "last", "--trainer.max_steps", "4"], cwd=tmp_path,
                script=script)
    assert "resuming from" in p.stdout


def test_configs_merge_and_interpolate(tmp_path, shards):
    probe_config(tmp_path / "base.yaml", shards, steps=2)
    with open(tmp_path / "over.yaml", "w") as f:
        yaml.safe_dump({"name": "merged", "data": {"init_args": {"batch_size": 1, "num_workers": 0}},
                        "trainer": {"max_steps": "${data.init_args.batch_size}"}}, f)
    run_cli(["fit", "--config", "base.yaml", "--config", "over.yaml"], cwd=tmp_path)
    saved = yaml.safe_load(open(tmp_path / "runs" / "merged" / "config.yaml"))
    assert saved["data"]["init_args"]["batch_size"] == 1 and saved["trainer"]["max_steps"] == 1


def test_ckpt_last_without_checkpoint_starts_fresh(tmp_path, shards):
    probe_config(tmp_path / "p.yaml", shards, steps=1)
    p = run_cli(["fit", "--config", "p.yaml", "--ckpt_path", "last"], cwd=tmp_path)
    assert "no checkpoint at" in p.stdout and "starting fresh" in p.stdout


def test_config_errors_before_any_work(tmp_path, shards):
    probe_config(tmp_path / "p.yaml", shards, steps=1)
    bad_shards = ["fit", "--config", "p.yaml", "--data.init_args.train_shards", str(tmp_path / "no-{000..003}.tar")]
    p = run_cli(bad_shards, cwd=tmp_path, check=False)
    assert p.returncode == 2 and "config error" in p.stderr and "data.train_shards" in p.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started
    p = run_cli(["fit", "--config", "p.yaml", "--data.init_args.crop", "middle"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "data.crop='middle' is not one of ['center', 'random']" in p.stderr
    p = run_cli(["fit", "--config", "p.yaml", "--model.init_args.num_frames", "7"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "num_frames" in p.stderr and "linked" in p.stderr


def test_tool_dispatch_and_usage(tmp_path):
    p = run_cli(["--help"], cwd=tmp_path)
    for cmd in ("fit", "shards", "demo-data", "fvd", "consolidate"):
        assert cmd in p.stdout
    p = run_cli(["nonsense"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "unknown command" in p.stderr
