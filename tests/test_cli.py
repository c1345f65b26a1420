"""The two console scripts, run directories, config errors reported before any work."""

import glob
import os

import lightning.pytorch  # noqa: F401 - imported here, its log handler keeps pytest's stderr, not a test's capsys
import pytest
import yaml

from cliutil import ROOT, probe_config, run_cli
from shardgen import write_shards
from vidgen import cli


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
    assert "[vidgen] data stream resumes after batch 3" in p.stdout  # (4 batches an epoch: a mid-epoch resume)


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


RECIPES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))
                 if os.sep + "trainer" + os.sep not in p)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_prints(recipe, capsys, tmp_path, monkeypatch):
    """Every recipe parses and links (``--print_config`` checks no data paths); in-process, no training."""
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["fit", "--config", os.path.join(ROOT, recipe), "--print_config"])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, None), err[-2000:]
    cfg = yaml.safe_load(out)
    model, data = cfg["model"]["init_args"], (cfg.get("data") or {}).get("init_args") or {}
    written = yaml.safe_load(open(os.path.join(ROOT, recipe)))
    for key, value in (((written.get("model") or {}).get("init_args")) or {}).items():
        if key in cli.LINKED_KEYS:  # a value the recipe writes is the one the model gets (linked or its own)
            assert model[key] == value, (key, model[key], value)
    if recipe.startswith("configs/eval/probe"):  # the probe reads num_frames frames out of a longer data clip
        assert model["num_frames"] < data["num_frames"]


def test_a_model_value_equal_to_its_default_is_not_silently_relinked(capsys, tmp_path, monkeypatch, shards):
    """An explicit model value that differs from the data's is a conflict even when it equals the model's default
    (VideoProbe's resolution defaults to 32)."""
    monkeypatch.chdir(tmp_path)
    probe_config(tmp_path / "p.yaml", shards, steps=1)  # data resolution 16
    argv = ["fit", "--config", "p.yaml", "--model", "vidgen.lightning_modules.probe.VideoProbe", "--print_config"]
    for extra, code_want in (([], 0), (["--model.init_args.resolution", "32"], 2)):
        try:
            code = cli.main(argv + extra)
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        assert (code or 0) == code_want, (extra, err[-2000:])
    assert "model.init_args.resolution=32 conflicts with data.init_args.resolution=16" in err
    assert yaml.safe_load(out.split("vidgen:")[0] or "{}") in (None, {})


def test_predict_hints_and_package_metadata_say_what_is_true():
    """``--classes``/``--prompts`` are jsonargparse lists (one argument); pyproject names the five papers and ships no
    package data that does not exist."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore

    from vidgen.predict import PredictInputError, conditioning_items, __doc__ as predict_doc

    with pytest.raises(PredictInputError, match=r"""--prompts '\["caption", \.\.\.\]'"""):
        conditioning_items({"kind": "text"}, None, None, None)
    with pytest.raises(PredictInputError, match=r"--classes '\[0, 3\]'"):
        conditioning_items({"kind": "class", "num_classes": 4}, None, None, None)
    assert "--classes '[0, 3, 7]'" in predict_doc and "--classes 0 3 7" not in predict_doc
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    for paper in ("MAGVIT", "MAGVIT-v2", "VideoPoet", "Make-A-Video", "Latte", "Tora"):
        assert paper in meta["project"]["description"], paper
    for pkg, patterns in meta["tool"]["setuptools"].get("package-data", {}).items():
        src = meta["tool"]["setuptools"]["package-dir"].get(pkg, pkg)
        for pattern in patterns:
            assert glob.glob(os.path.join(ROOT, src, pattern)), (pkg, pattern)
