"""Run directories through the CLI (issue 11 §3, issue 9 §3-§4): a re-run gets a new version, ``--ckpt_path last``
resumes the latest version (falling back to the newest readable step checkpoint when ``last.ckpt`` is cut), stale
temporaries of that run are removed, checkpoints get the umask's mode, ``last.ckpt`` holds the end of the run, and
validate/predict write into their own subfolder without touching the training run's files."""

import hashlib
import os
import stat

import pytest
import torch
import yaml

from cliutil import probe_config, run_cli
from shardgen import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("vshards")
    write_shards(str(d), n_shards=2, per_shard=4, frames=10)
    return str(d)


def _step(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _snapshot(run) -> dict:
    """Every file of a run directory with its content hash."""
    out = {}
    for dirpath, _, files in os.walk(run):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, run)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


def test_versions_resume_fallback_and_eval_subfolders(tmp_path, shards):
    probe_config(tmp_path / "p.yaml", shards, steps=3, val_shards=shards)
    p = run_cli(["fit", "--config", "p.yaml", "--checkpoint_every_n_steps", "2"], cwd=tmp_path, timeout=900)
    run0, run1 = tmp_path / "runs/p", tmp_path / "runs/p-v1"
    # last.ckpt is the final state (step 3), not the last periodic save (step 2)
    assert _step(run0 / "checkpoints/last.ckpt") == 3 and _step(run0 / "checkpoints/step00000002.ckpt") == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(run0 / "checkpoints/last.ckpt").st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert "Tip:" not in p.stdout + p.stderr and "not recommended" not in p.stderr
    before = _snapshot(run0)

    # a fresh run with the same name: a new version, the first one untouched
    p = run_cli(["fit", "--config", "p.yaml", "--checkpoint_every_n_steps", "2"], cwd=tmp_path, timeout=900)
    assert str(run1) in p.stdout and _snapshot(run0) == before
    assert _step(run1 / "checkpoints/last.ckpt") == 3

    # --ckpt_path last resumes the latest version; a cut last.ckpt falls back to the newest readable step file;
    # temporaries a killed save left in this run are removed, another run's are not
    (run1 / "checkpoints/last.ckpt.tmp-999-dead").write_bytes(b"x" * 100)
    (run0 / "checkpoints/last.ckpt.tmp-999-dead").write_bytes(b"x" * 100)
    data = (run1 / "checkpoints/last.ckpt").read_bytes()
    (run1 / "checkpoints/last.ckpt").write_bytes(data[: len(data) // 2])
    p = run_cli(["fit", "--config", "p.yaml", "--ckpt_path", "last", "--trainer.max_steps", "4"], cwd=tmp_path, timeout=900)
    assert f"resuming from {run1}/checkpoints/step00000002.ckpt" in p.stdout
    assert "last.ckpt is unreadable" in p.stdout and "step00000002.ckpt" in p.stdout
    assert not (run1 / "checkpoints/last.ckpt.tmp-999-dead").exists()
    assert (run0 / "checkpoints/last.ckpt.tmp-999-dead").exists()
    assert _step(run1 / "checkpoints/last.ckpt") == 4


def test_validate_and_predict_leave_the_training_run_untouched(tmp_path, shards):
    probe_config(tmp_path / "p.yaml", shards, steps=2, val_shards=shards)
    run_cli(["fit", "--config", "p.yaml"], cwd=tmp_path, timeout=900)
    run_cli(["fit", "--config", "p.yaml", "--trainer.max_steps", "3"], cwd=tmp_path, timeout=900)
    run0, run1 = tmp_path / "runs/p", tmp_path / "runs/p-v1"
    before0, before1 = _snapshot(run0), _snapshot(run1)
    # validate and predict write into their own subfolders of the latest run and touch none of its files
    p = run_cli(["validate", "--config", "p.yaml", "--ckpt_path", "last"], cwd=tmp_path, timeout=900)
    assert f"resuming from {run1}/checkpoints/last.ckpt" in p.stdout
    p = run_cli(["predict", "--config", "p.yaml", "--ckpt_path", "last",
                 "--data.init_args.predict_shards", shards], cwd=tmp_path, timeout=900)
    after1 = _snapshot(run1)
    assert {k: v for k, v in after1.items() if not k.startswith(("validate/", "predict/"))} == before1
    assert _snapshot(run0) == before0
    assert any(k.startswith("validate/") for k in after1) and (run1 / "predict/config.yaml").exists()
    assert yaml.safe_load(open(run1 / "config.yaml"))["trainer"]["max_steps"] == 3  # the training config


def test_stacked_interpolation_and_print_config_shows_linked_values(tmp_path, shards):
    probe_config(tmp_path / "base.yaml", shards, steps=2, num_frames=4)
    with open(tmp_path / "over.yaml", "w") as f:  # refers to values only the first config sets
        yaml.safe_dump({"trainer": {"max_steps": "${data.init_args.num_frames}"},
                        "data": {"init_args": {"resolution": 8}}}, f)
    p = run_cli(["fit", "--config", "base.yaml", "--config", "over.yaml", "--print_config"], cwd=tmp_path, timeout=900)
    cfg = yaml.safe_load(p.stdout)
    assert cfg["trainer"]["max_steps"] == 4
    assert cfg["model"]["init_args"]["num_frames"] == 4 and cfg["model"]["init_args"]["resolution"] == 8
    assert not (tmp_path / "runs").exists()


def test_help_shows_the_linked_values(tmp_path):
    """``--help`` lists the data -> model links, and a linked model option's own help names its source."""
    p = run_cli(["fit", "--help"], cwd=tmp_path)
    section = p.stdout.split("Linked arguments:", 1)[1]
    for key in ("num_frames", "resolution", "frame_stride"):
        assert f"data.init_args.{key} --> model.init_args.{key}" in section
    p = run_cli(["fit", "--model.help", "vidgen.lightning_modules.latte.Latte"], cwd=tmp_path)
    after = " ".join(p.stdout.split("--model.num_frames NUM_FRAMES\n", 1)[1].split()[:7])
    assert after == "linked from data.init_args.num_frames: set it under data", after
    assert p.stdout.count("linked from") == 2  # num_frames and resolution (Latte takes no frame_stride), nothing else
