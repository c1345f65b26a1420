"""Labels from the user's data (#11 §6): class folders and string labels become integer labels + classes.json named
by the shard index; a class-conditional recipe on unlabelled shards is a config error (exit 2) before any work."""

import json
import os
import tarfile

import numpy as np
import pytest

from cliutil import ROOT, run_cli
from vidgen import shards


def _image(path, value):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _labels(out_dir):
    got = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out_dir, name)) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.load(tf.extractfile(m))
                        got[os.path.basename(meta["source"])] = (meta["label"], meta.get("class_name"))
    return got


def test_class_folders_through_vidgen_shards(tmp_path, capsys):
    """UCF-101 layout root/<class>/<file>: sorted class names -> ids, classes.json referenced from index.json; the
    val split packed with --class-map gets the same ids even when it lacks a class."""
    for cls, files in {"PlayingPiano": ["a.png", "b.png"], "ApplyEyeMakeup": ["c.png"], "Biking": ["d.png"]}.items():
        for f in files:
            _image(str(tmp_path / "train" / cls / f), 100)
    _image(str(tmp_path / "val" / "PlayingPiano" / "e.png"), 50)
    assert shards.main([str(tmp_path / "train"), str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 0
    assert "4 samples in 3 classes" in capsys.readouterr().out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert (index["classes"], index["num_classes"], index["num_labelled"]) == ("classes.json", 3, 4)
    classes = json.loads((tmp_path / "out" / index["classes"]).read_text())["classes"]
    assert classes == ["ApplyEyeMakeup", "Biking", "PlayingPiano"]
    assert _labels(tmp_path / "out") == {"a.png": (2, "PlayingPiano"), "b.png": (2, "PlayingPiano"),
                                         "c.png": (0, "ApplyEyeMakeup"), "d.png": (1, "Biking")}
    assert shards.main([str(tmp_path / "val"), str(tmp_path / "outv"), "--workers", "1", "--no-progress",
                        "--class-map", str(tmp_path / "out" / "classes.json")]) == 0
    assert _labels(tmp_path / "outv") == {"e.png": (2, "PlayingPiano")}  # alone it would have been class 0


def test_string_labels_in_csv_and_jsonl_map_the_same_way(tmp_path):
    for f in "abc":
        _image(str(tmp_path / f"{f}.png"), 10)
    (tmp_path / "list.csv").write_text("path,label\na.png,dog\nb.png,cat\nc.png,dog\n")
    idx = shards.write_shards(str(tmp_path / "list.csv"), str(tmp_path / "o1"), progress=False)
    assert idx["num_classes"] == 2 and _labels(tmp_path / "o1") == {"a.png": (1, "dog"), "b.png": (0, "cat"),
                                                                     "c.png": (1, "dog")}
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": f"{f}.png", "label": lab}) + "\n"
                                                 for f, lab in zip("abc", ["dog", "cat", "dog"])))
    shards.write_shards(str(tmp_path / "list.jsonl"), str(tmp_path / "o2"), progress=False)
    assert _labels(tmp_path / "o2") == _labels(tmp_path / "o1")
    # integer ids stay ids (no classes.json); mixing ids and names is refused
    (tmp_path / "ids.csv").write_text("path,label\na.png,3\nb.png,\n")
    idx = shards.write_shards(str(tmp_path / "ids.csv"), str(tmp_path / "o3"), progress=False)
    assert "classes" not in idx and idx["num_labelled"] == 1 and _labels(tmp_path / "o3")["a.png"] == (3, None)
    (tmp_path / "mixed.csv").write_text("path,label\na.png,3\nb.png,cat\n")
    with pytest.raises(shards.ShardsError, match="mix class names"):
        shards.write_shards(str(tmp_path / "mixed.csv"), str(tmp_path / "o4"), progress=False)


def test_class_conditional_recipe_on_unlabelled_shards_exits_2(tmp_path):
    for f in "ab":
        _image(str(tmp_path / "flat" / f"{f}.png"), 10)
    idx = shards.write_shards(str(tmp_path / "flat"), str(tmp_path / "unlabelled"), progress=False)
    assert idx["num_labelled"] == 0 and "classes" not in idx
    p = run_cli(["fit", "--config", os.path.join(ROOT, "configs/latte/ucf101_tiny.yaml"),
                 "--data.init_args.train_shards", str(tmp_path / "unlabelled"),
                 "--data.init_args.val_shards", "null"], cwd=tmp_path, check=False)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "require_labels" in p.stderr and "hold no labels" in p.stderr and "max_bad_fraction" in p.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))
