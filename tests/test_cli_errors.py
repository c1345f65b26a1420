"""Errors a user makes in configs are one line naming the key and the fix, exit 2, no usage wall and no traceback
(issue 9 §5); a dataset that is too broken is one line, exit 1, with the traceback kept in the run's error.log.
Run in-process (all of these stop before any training step)."""

import os

import pytest
import yaml

from cliutil import cli_in_process, probe_config, run_cli
from shardgen import write_shards
from vidgen import cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("eshards")
    write_shards(str(d), n_shards=1, per_shard=4, frames=10)
    return str(d)


vidgen = cli_in_process  # (exit code, stdout, stderr) of `vidgen *argv` in this process


def one_error(capsys, *argv, code=2) -> str:
    got, out, err = vidgen(capsys, *argv)
    assert got == code, (got, out[-2000:], err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    first = next(i for i, ln in enumerate(lines) if ln.startswith("vidgen: "))
    lines = lines[first:]
    assert 1 <= len(lines) <= 2, err  # the message, at most a hint
    assert "usage:" not in err and "Traceback" not in err
    return " ".join(lines)


@pytest.fixture
def cfg(tmp_path, shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probe_config(tmp_path / "p.yaml", shards, steps=1)
    return "p.yaml"


def test_parser_errors_are_one_line_with_the_closest_key(capsys, cfg):
    msg = one_error(capsys, "fit", "--config", cfg, "--trainer.max_stepz", "3")
    assert "trainer.max_stepz" in msg and "did you mean --trainer.max_steps?" in msg and "--help" in msg
    msg = one_error(capsys, "fit", "--config", cfg, "--data.init_args.sed", "3")
    assert "'sed'" in msg and "did you mean 'seed'" in msg
    msg = one_error(capsys, "fit", "--config", cfg, "--trainer.precision", "17")
    assert "trainer.precision" in msg and "bf16-mixed" in msg and "17" in msg  # the allowed values
    msg = one_error(capsys, "fit", "--config", cfg, "--data.init_args.seed", "null")
    assert "seed" in msg and "required" in msg


def test_flag_and_file_errors(capsys, cfg, tmp_path, shards):
    msg = one_error(capsys, "fit", "--config", cfg, "--checkpoint_every_n_steps", "-1")
    assert "--checkpoint_every_n_steps must be a positive integer" in msg and "-1" in msg
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: 3\n   devices: [1\n")
    msg = one_error(capsys, "fit", "--config", cfg, "--config", "bad.yaml")
    assert "bad.yaml" in msg and "line 3" in msg and "YAML" in msg
    msg = one_error(capsys, "fit", "--config", cfg, "--data.init_args.train_shards",
                    f"[{shards}, {tmp_path}/typo/*.tar]")
    assert "data.train_shards[1]" in msg and "typo/*.tar" in msg and "matches no files" in msg
    assert not (tmp_path / "runs").exists()


def test_latte_latent_size_is_checked_before_the_model_is_built(capsys, tmp_path, monkeypatch, shards):
    from cliutil import ROOT

    monkeypatch.chdir(tmp_path)
    msg = one_error(capsys, "fit", "--config", os.path.join(ROOT, "configs/latte/ucf101_tiny.yaml"),
                    "--data.init_args.resolution", "36", "--data.init_args.train_shards", shards,
                    "--data.init_args.val_shards", shards)
    assert "latent size 9" in msg and "patch_size 2" in msg and "resolution" in msg


def test_dropped_callbacks_warn(capsys, cfg, tmp_path):
    with open(tmp_path / "base.yaml", "w") as f:
        yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "vidgen.callbacks.ema.EMA"},
                                                  {"class_path": "vidgen.callbacks.throughput.VideoThroughputMonitor"}]}}, f)
    with open(tmp_path / "over.yaml", "w") as f:
        yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "vidgen.callbacks.throughput.VideoThroughputMonitor"}]}}, f)
    code, out, err = vidgen(capsys, "fit", "--config", cfg, "--config", "base.yaml", "--config", "over.yaml",
                            "--print_config")
    assert code == 0
    assert "over.yaml sets trainer.callbacks" in err and "drops EMA" in err and "--trainer.callbacks+=" in err
    assert [c["class_path"].rsplit(".", 1)[-1] for c in yaml.safe_load(out)["trainer"]["callbacks"]] == ["VideoThroughputMonitor"]


def test_too_broken_data_is_one_line_with_the_traceback_in_the_log(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shards(str(tmp_path / "bad"), 1, 8, frames=10, corrupt=set(range(7)))
    probe_config(tmp_path / "b.yaml", str(tmp_path / "bad"), steps=3, workers=1, batch=1)
    # a subprocess, as the user meets it (in-process, the crashed fit leaked optimizer state into later tests)
    p = run_cli(["fit", "--config", "b.yaml", "--data.init_args.bad_min_samples", "4"], cwd=tmp_path, check=False,
                timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("vidgen: ")):]
    assert 1 <= len(lines) <= 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    msg = " ".join(lines)
    assert "data error" in msg and "max_bad_fraction" in msg and "Original Traceback" not in msg
    log = (tmp_path / "runs/b/error.log").read_text()
    assert "Traceback" in log and "BadDataError" in log


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    from vidgen.runtime import resume_checkpoint

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    assert resume_checkpoint(str(ck)) is None  # nothing saved yet: start fresh
    (ck / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    (ck / "step00000004.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no readable checkpoint .*last.ckpt \(.*step00000004.ckpt"):
        resume_checkpoint(str(ck))
