"""Checkpoints given to the CLI: the config is the source of truth (a checkpoint's saved hyper-parameters never
replace it silently), a missing, absent or wrong-class checkpoint is one line (exit 2) before anything is built, a
resume says where the data stream continues, and the tools report bad input as one line. In-process unless a run
has to train."""

import os

import lightning.pytorch  # noqa: F401 - imported here, its log handler keeps pytest's stderr, not a test's capsys
import pytest
import torch
import yaml

from cliutil import ROOT, cli_in_process, probe_config
from shardgen import write_shards
from vidgen import cli

STREAM_PROBE = "vidgen.lightning_modules.stream_probe.StreamProbe"
VIDEO_PROBE = "vidgen.lightning_modules.probe.VideoProbe"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("kshards")
    write_shards(str(d), n_shards=1, per_shard=8, frames=10)
    return str(d)


@pytest.fixture
def cfg(tmp_path, shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probe_config(tmp_path / "p.yaml", shards, steps=1)
    return "p.yaml"


def fake_checkpoint(path, class_path, **hparams):
    """What LightningCLI saves, minus the weights (all the CLI reads before building)."""
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path, **hparams}}, path)
    return str(path)


vidgen = cli_in_process  # (exit code, stdout, stderr) of `vidgen *argv` in this process


def one_error(capsys, *argv) -> str:
    code, out, err = vidgen(capsys, *argv)
    assert code == 2, (code, out[-2000:], err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("vidgen")):]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_explicit_ckpt_path_keeps_the_config_and_names_what_differs(capsys, cfg, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "s.ckpt", STREAM_PROBE, channels=8, lr=0.003, keys_log=None, num_frames=4)
    code, out, err = vidgen(capsys, "fit", "--config", cfg, "--model.init_args.channels", "6",
                            "--model.init_args.lr", "0.5", "--ckpt_path", ckpt, "--print_config")
    assert code == 0, err[-3000:]
    explicit = yaml.safe_load(out)
    assert explicit["model"]["init_args"]["channels"] == 6 and explicit["model"]["init_args"]["lr"] == 0.5
    notes = [ln for ln in err.splitlines() if "differ from the checkpoint" in ln]
    assert len(notes) == 1 and "channels: 6 vs 8" in notes[0] and "lr: 0.5 vs 0.003" in notes[0], err
    assert "num_frames" not in notes[0]  # equal values are not listed
    code, out, err = vidgen(capsys, "fit", "--config", cfg, "--model.init_args.channels", "6",
                            "--model.init_args.lr", "0.5", "--ckpt_path", "last", "--print_config")
    last = yaml.safe_load(out)
    assert code == 0 and {**explicit, "ckpt_path": None} == {**last, "ckpt_path": None}


def test_missing_or_wrong_class_ckpt_path_is_one_line_before_anything_is_built(capsys, cfg, tmp_path):
    msg = one_error(capsys, "fit", "--config", cfg, "--ckpt_path", str(tmp_path / "nope.ckpt"))
    assert "nope.ckpt: no such file" in msg and "--ckpt_path last" in msg
    probe = fake_checkpoint(tmp_path / "probe.ckpt", VIDEO_PROBE, num_frames=15)
    msg = one_error(capsys, "fit", "--config", cfg, "--ckpt_path", probe)
    assert "probe.ckpt is a VideoProbe checkpoint, not a StreamProbe one" in msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_eval_with_ckpt_path_last_and_no_checkpoint_stops(capsys, cfg, tmp_path, sub):
    msg = one_error(capsys, sub, "--config", cfg, "--ckpt_path", "last")
    assert "--ckpt_path last: no checkpoint in" in msg and "train first" in msg
    assert not (tmp_path / "runs").exists()


def test_a_probe_checkpoint_given_as_a_tokenizer_says_what_it_is(capsys, tmp_path, shards, monkeypatch):
    from vidgen.lightning_modules.nn.conv3d import ConfigError
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    monkeypatch.chdir(tmp_path)
    probe = fake_checkpoint(tmp_path / "probe.ckpt", VIDEO_PROBE, num_frames=15, resolution=32)
    with pytest.raises(ConfigError, match="probe.ckpt is a VideoProbe checkpoint, not a VideoTokenizer one"):
        VideoTokenizer.load_frozen(probe)
    msg = one_error(capsys, "tokenize", "--checkpoint", probe, "--shards", shards, "--out", str(tmp_path / "tok"))
    assert "VideoProbe checkpoint, not a VideoTokenizer one" in msg
    # through the model's __init__: jsonargparse's multi-line error comes out as its innermost line
    msg = one_error(capsys, "fit", "--config", os.path.join(ROOT, "configs/magvit/ucf101_cg_tiny.yaml"),
                    "--model.init_args.tokenizer_path", probe, "--data.init_args.train_shards", shards,
                    "--data.init_args.val_shards", "null")
    assert msg.startswith("vidgen: config error: ") and "VideoProbe checkpoint, not a VideoTokenizer one" in msg
    msg = one_error(capsys, "fit", "--config", os.path.join(ROOT, "configs/magvit/tokenizer_ucf101_tiny.yaml"),
                    "--model.init_from_2d", probe, "--data.init_args.train_shards", shards,
                    "--data.init_args.val_shards", "null")
    assert "init_from_2d=" in msg and "probe.ckpt is a VideoProbe checkpoint" in msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [
    ["export", "nope.ckpt", "out.safetensors"],
    ["consolidate", "p.yaml", "out.ckpt"],
    ["trajectories", "--shards", "nope", "--out", "t"],
    ["eval", "--metrics", "accuracy", "--probe", "nope.ckpt", "--fake", "."],
    ["fvd", "--real", "SHARDS", "--fake", "SHARDS", "--i3d", "nope.pt", "--no-cache"],
], ids=lambda a: a[0])
def test_tool_bad_input_is_one_line(capsys, cfg, shards, argv, monkeypatch):
    argv = [shards if a == "SHARDS" else a for a in argv]
    monkeypatch.delenv("VIDGEN_DEBUG", raising=False)
    msg = one_error(capsys, *argv)
    assert msg.startswith(f"vidgen {argv[0]}: error: "), msg
    monkeypatch.setenv("VIDGEN_DEBUG", "1")
    with pytest.raises((OSError, ValueError, KeyError)):  # the traceback, for debugging
        cli.main(list(argv))


def test_lightnings_not_resumable_warning_is_filtered():
    """Lightning warns on a mid-epoch resume unless each loader is stateful; VideoDataModule keeps the state itself
    and resumes exactly (tests/test_resume.py), so vidgen drops that warning (test_cli.py: a resume says where it
    continues instead)."""
    import ast
    import inspect
    import warnings

    from lightning.pytorch.loops import training_epoch_loop
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    msgs = [n.value for n in ast.walk(ast.parse(inspect.getsource(training_epoch_loop)))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and "not resumable" in n.value]
    assert len(msgs) == 1
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        cli._quiet_resume_warning()
        warnings.warn(msgs[0], PossibleUserWarning)
        warnings.warn("another warning", PossibleUserWarning)
    assert [str(w.message) for w in got] == ["another warning"]
