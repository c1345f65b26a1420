"""VideoPoet training from token shards (spec §2.7): the images-90% -> videos-90% switch at 25% of the iterations
through StagedCurriculum, identical after a resume; `vidgen tokenize` adds cached text embeddings to token shards;
task adaptation starts from a pretrained LM; the recipes validate."""

from __future__ import annotations

import glob
import io
import json
import os

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from vidgen.callbacks.curriculum import StagedCurriculum
from vidgen.datamodules.tario import make_index, write_index
from vidgen.datamodules.video import VideoDataModule
from vidgen.lightning_modules.videopoet import VideoPoet
from vidgen.shards import ShardWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, D = 16, 8


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_token_shards(out, n, t, seed, text=True):
    rng = np.random.default_rng(seed)
    w = ShardWriter(str(out), "tokens", max_samples=max(1, n // 2))
    for i in range(n):
        members = {"npy": _npy(rng.integers(0, K, (t, 2, 2)).astype(np.int16)), "txt": f"caption {i}".encode(),
                   "json": json.dumps({"fps": 8, "text_len": 2}).encode()}
        if text:
            members["text.npy"] = _npy(rng.standard_normal((3, D)).astype(np.float16))
        w.write(f"{seed}-{i:04d}", members)
    write_index(str(out), make_index(w.close()))
    return str(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp")
    return write_token_shards(root / "images", 20, 1, 1), write_token_shards(root / "videos", 20, 3, 2)


class Recorder(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, int(batch["tokens"].shape[1]), int(batch["tokens"].shape[0]),
                          tuple(batch["key"])))
        assert batch["text_emb"].shape[1:] == (3, D) and batch["text_len"].tolist() == [2] * len(batch["key"])


TOTAL = 32  # the run's length: the switch is at 25% of it, also for a run stopped early to be resumed


def _fit(tmp, shards, steps, ckpt_in=None, ckpt_out=None):
    torch.manual_seed(0)
    model = VideoPoet(size="tiny", visual_codes=K, text_dim=D, max_text_tokens=3, tasks={"t2i": 1, "t2v": 1, "fp": 1},
                      warmup_steps=0, total_steps=TOTAL)
    dm = VideoDataModule(sources=[{"shards": shards[0], "name": "images", "weight": 0.9, "batch_size": 5},
                                  {"shards": shards[1], "name": "videos", "weight": 0.1, "batch_size": 1}],
                         seed=0, batch_size=1, num_workers=0, resampled=True)
    rec = Recorder()
    cur = StagedCurriculum(total_steps=TOTAL, stages=[{"name": "images_90", "weights": {"images": 0.9, "videos": 0.1}},
                            {"name": "videos_90", "at_fraction": 0.25, "weights": {"images": 0.1, "videos": 0.9}}])
    tr = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[cur, rec],
                   default_root_dir=str(tmp), num_sanity_val_steps=0, limit_val_batches=0)
    tr.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out:
        tr.save_checkpoint(ckpt_out)
    return model, rec, tr


def test_90_10_switch_at_25_percent_survives_resume(shards, tmp_path):
    steps = TOTAL
    _, full, _ = _fit(tmp_path, shards, steps)
    kinds = [t for _, t, _, _ in full.seen]
    assert [s for s, *_ in full.seen] == list(range(steps))
    assert all(bs == (5 if t == 1 else 1) for _, t, bs, _ in full.seen)  # per-group batch size: 5x more images
    first, rest = kinds[: steps // 4], kinds[steps // 4:]
    assert first.count(1) >= 6 and rest.count(3) >= 19, kinds   # images ~90% then videos ~90%
    ckpt = str(tmp_path / "mid.ckpt")
    _fit(tmp_path, shards, 12, ckpt_out=ckpt)
    _, resumed, _ = _fit(tmp_path, shards, steps, ckpt_in=ckpt)
    assert resumed.seen == full.seen[12:], "the resumed stream (group, batch, keys) equals the uninterrupted one"


def test_tokenize_adds_text_embeddings_to_token_shards(shards, tmp_path):
    from vidgen.tokenize import main as tokenize_main

    src = write_token_shards(tmp_path / "in", 4, 3, 7, text=False)
    out = tmp_path / "out"
    assert tokenize_main(["--shards", src, "--out", str(out), "--text-encoder", "minilm", "--max-text-tokens", "5",
                          "--num-workers", "0", "--device", "cpu"]) == 0
    dm = VideoDataModule(train_shards=str(out), seed=0, batch_size=2, num_workers=0)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["tokens"].shape == (2, 3, 2, 2) and b["text_emb"].shape == (2, 5, 384)
    assert all(1 < n <= 5 for n in b["text_len"].tolist())
    assert json.loads((out / "index.json").read_text())["text_encoder"]["dim"] == 384
    # without a tokenizer checkpoint and without a text encoder there is nothing to write: an early error
    assert tokenize_main(["--shards", src, "--out", str(tmp_path / "x")]) == 2


def test_task_adaptation_starts_from_the_pretrained_lm(tmp_path):
    a = VideoPoet(size="tiny", visual_codes=K, text_dim=D, tasks={"t2v": 1})
    torch.save({"state_dict": a.state_dict()}, tmp_path / "pre.ckpt")
    b = VideoPoet(size="tiny", visual_codes=K, text_dim=D, tasks={"t2v": 1, "i2v": 1}, init_from=str(tmp_path / "pre.ckpt"))
    assert b.init_report.exact
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k])


def _lm_configs():
    """The VideoPoet LM recipes in configs/videopoet/ (the tokenizer, audio-tokenizer and SR recipes there are other
    models: tests/test_tokenizer_cli.py and tests/test_recipe_chains.py build them)."""
    paths = sorted(glob.glob(os.path.join(ROOT, "configs/videopoet/*.yaml")))
    return [p for p in paths if yaml.safe_load(open(p))["model"]["class_path"] == "vidgen.lightning_modules.videopoet.VideoPoet"]


def test_the_lm_recipes_are_found():
    assert len(_lm_configs()) >= 6  # adapt_t2v_i2v, schedule_90_10, v2a_a2v and their _tiny siblings


@pytest.mark.parametrize("path", _lm_configs(), ids=os.path.basename)
def test_videopoet_configs_validate(path):
    cfg = yaml.safe_load(open(path))
    args = dict(cfg["model"]["init_args"])
    for key in ("tokenizer_path", "audio_tokenizer_path", "init_from"):  # produced by earlier runs
        args.pop(key, None)
    args.setdefault("visual_codes", 262144)
    VideoPoet.validate_config(args)
    if path.endswith("_tiny.yaml"):
        assert "demo" in json.dumps(cfg["data"])
