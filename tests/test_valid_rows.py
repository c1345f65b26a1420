"""Eval batches' DDP padding (``batch["valid"]`` False) is dropped by every consumer through ``nn/batches.py``:
the helper's slicing; models' validation_step logs what the batch of its real rows alone logs (a batch of padding
only logs the same keys with weight 0); FVD ignores padded rows; the PredictionWriter writes each key once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vidgen.lightning_modules.nn.batches import eval_rows, keep_valid, valid_rows

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log", "ignore:.*compute.*before")


def test_helper_slices_tensors_lists_and_keeps_the_rest():
    v = torch.arange(4 * 2).reshape(4, 2)
    batch = {"video": v, "key": ["a", "b", "c", "d"], "text": ("w", "x", "y", "z"), "label": torch.tensor([0, 1, 2, 3]),
             "fps": None, "sample_rate": 16000, "task": "CG", "other": [1, 2], "valid": torch.tensor([1, 0, 1, 0]).bool()}
    kept = keep_valid(batch)
    assert torch.equal(kept["video"], v[[0, 2]]) and kept["key"] == ["a", "c"] and kept["text"] == ("w", "y")
    assert kept["label"].tolist() == [0, 2] and kept["valid"].tolist() == [True, True]
    assert kept["fps"] is None and kept["sample_rate"] == 16000 and kept["task"] == "CG" and kept["other"] == [1, 2]
    assert keep_valid(kept) is kept  # no padding left: the very same object
    assert batch["key"] == ["a", "b", "c", "d"]  # the input is not modified
    train = {"video": v, "key": list("abcd")}
    assert valid_rows(train) is None and keep_valid(train) is train and eval_rows(train) == (train, 4)
    full = dict(train, valid=torch.ones(4, dtype=torch.bool))
    assert keep_valid(full) is full and eval_rows(full) == (full, 4)
    # another mask (an eval batch's) applied to a prediction dict
    pred = {"videos": v, "keys": list("abcd"), "sample_rate": 8}
    assert keep_valid(pred, torch.tensor([False, True, True, False]))["keys"] == ["b", "c"]
    # padding only: keep_valid empties it; eval_rows gives one row to compute on and n = 0
    pad = dict(train, valid=torch.zeros(4, dtype=torch.bool))
    assert keep_valid(pad)["video"].shape[0] == 0 and keep_valid(pad)["key"] == []
    one, n = eval_rows(pad)
    assert n == 0 and one["key"] == ["a"] and one["video"].shape[0] == 1
    part, n = eval_rows(batch)
    assert n == 2 and part["key"] == ["a", "c"]


# ----------------------------------------------------------------------------------------- models' validation_step
def _logs(model, batch, idx=0):
    got = {}

    def log(name, value, *a, batch_size=None, **kw):
        got[name] = (value.detach().clone() if isinstance(value, torch.Tensor) else value, batch_size)

    model.log = log
    with torch.no_grad():
        model.validation_step(batch, idx)
    return got


def _padded(real: dict, pad_rows: list[int], order: list[int]) -> dict:
    """``real`` (B rows) with extra rows (copies of ``pad_rows`` perturbed, so that counting them would show) placed
    at ``order`` positions; ``valid`` marks the real ones."""
    rows = list(range(len(real["key"]))) + [-1 - i for i in range(len(pad_rows))]
    rows = [rows[i] for i in order]
    out = {}
    for k, v in real.items():
        def row(r):
            if r >= 0:
                return v[r]
            x = v[pad_rows[-1 - r]]
            return x.flip(-1) * 0.5 if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        out[k] = torch.stack([row(r) for r in rows]) if isinstance(v, torch.Tensor) else [row(r) for r in rows]
    out["valid"] = torch.tensor([r >= 0 for r in rows])
    return out


def _check_model(model, real):
    model.eval()
    ref = _logs(model, dict(real, valid=torch.ones(len(real["key"]), dtype=torch.bool)), 3)
    padded = _padded(real, [0, 1], [0, 3, 1, 2])  # real 0, pad, real 1, real 2 ... (B=3 real + 1 pad)
    got = _logs(model, padded, 3)
    assert set(got) == set(ref) and ref
    for k, (v, bs) in ref.items():
        assert got[k][1] == bs == len(real["key"]), k
        if isinstance(v, torch.Tensor):
            assert torch.allclose(got[k][0], v, rtol=1e-5, atol=1e-6), (k, got[k][0], v)
    only_pad = dict(padded, valid=torch.zeros(4, dtype=torch.bool))
    empty = _logs(model, only_pad, 3)
    assert set(empty) == set(ref) and all(bs == 0 for _, bs in empty.values())
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v, _ in empty.values() if isinstance(v, torch.Tensor))
    return ref, got


def test_video_tokenizer_validation_drops_padding():
    from test_tokenizer_training import TINY

    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit", temporal_downsample=(True, False), **TINY),
                         bottleneck=dict(kind="vq", codebook_size=32, dim=8), discriminator=dict(enabled=False),
                         loss=dict(perceptual_weight=0), num_frames=4, resolution=16)
    g = torch.Generator().manual_seed(1)
    real = {"video": torch.rand(3, 3, 4, 16, 16, generator=g) * 2 - 1, "key": ["a", "b", "c"]}
    tok.eval()
    tok.val_psnr.reset()
    _logs(tok, dict(real, valid=torch.ones(3, dtype=torch.bool)))
    psnr_ref = tok.val_psnr.compute()
    usage_ref = tok.val_usage.counts.clone()
    tok.val_psnr.reset()
    tok.val_usage.reset()
    _check_model(tok, real)
    # metric objects: the padded batch and the padding-only batch add exactly what the real rows add
    tok.val_psnr.reset()
    tok.val_usage.reset()
    _logs(tok, _padded(real, [0], [0, 1, 3, 2]))
    _logs(tok, dict(_padded(real, [0], [0, 1, 3, 2]), valid=torch.zeros(4, dtype=torch.bool)))
    assert torch.allclose(tok.val_psnr.compute(), psnr_ref) and torch.equal(tok.val_usage.counts, usage_ref)


def test_magvit_validation_drops_padding():
    from test_magvit import tiny_model

    torch.manual_seed(0)
    model = tiny_model(tasks=["CG", "FP"])
    g = torch.Generator().manual_seed(2)
    real = {"video": torch.rand(3, 3, 8, 16, 16, generator=g) * 2 - 1, "label": torch.tensor([0, 3, 1]),
            "key": ["a", "b", "c"]}
    ref, _ = _check_model(model, real)
    assert {"val/loss", "val/loss_CG", "val/loss_FP"} <= set(ref)


def test_latte_validation_drops_padding():
    from test_latte import LM

    from vidgen.lightning_modules.latte import Latte

    torch.manual_seed(0)
    model = Latte(**LM)
    g = torch.Generator().manual_seed(3)
    real = {"video": torch.rand(3, 3, 4, 16, 16, generator=g) * 2 - 1, "label": torch.tensor([1, 4, 0]),
            "text": ["", "", ""], "key": ["a", "b", "c"]}
    ref, _ = _check_model(model, real)
    assert {"val/loss", "val/mse"} <= set(ref)


# ------------------------------------------------------------------------------------------------------ FVD
def test_fvd_ignores_padded_rows():
    from test_fvd import TinyExtractor

    from vidgen.callbacks.fvd import FrechetFeatureDistance, FVDCallback

    g = torch.Generator().manual_seed(4)
    clips = torch.rand(5, 3, 4, 16, 16, generator=g) * 2 - 1
    pad = -clips[1]  # a clip that would change both sides' statistics if counted
    v = lambda *r: torch.tensor(r)  # noqa: E731
    padded = [{"video": clips[0:2], "key": ["a", "b"], "valid": v(True, True)},
              {"video": torch.stack([clips[2], pad]), "key": ["c", "b"], "valid": v(True, False)},
              {"video": torch.stack([pad, pad]), "key": ["b", "b"], "valid": v(False, False)},
              {"video": clips[3:5], "key": ["d", "e"], "valid": v(True, True)}]
    clean = [{"video": clips[0:2], "key": ["a", "b"]}, {"video": clips[2:3], "key": ["c"]},
             {"video": clips[3:5], "key": ["d", "e"]}]

    class Feats(FrechetFeatureDistance):
        def prepare(self, videos):
            return videos

    class Recon(torch.nn.Module):
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.calls = []

        def generate(self, batch=None, num_samples=None, generator=None):
            self.calls.append(num_samples)
            return (batch["video"][:num_samples] * 0.8).clamp(-1, 1)

    def run(loader, num_samples):
        cb = FVDCallback.__new__(FVDCallback)  # built without an i3d file: set what evaluate() needs
        cb.num_samples, cb.batch_size, cb.seed, cb.use_ema, cb.pass_batches = num_samples, 8, 0, False, True
        cb.real_stats_path = cb.real_shards = None
        cb._warned = set()
        cb.metric = Feats(TinyExtractor(), TinyExtractor.feature_dim)
        trainer = SimpleNamespace(world_size=1, global_rank=0, datamodule=None, val_dataloaders=[loader], callbacks=[])
        model = Recon()
        keys = [k for b, _, _ in cb._samples(trainer, model) for k in b["key"]]
        value = cb.evaluate(trainer, model)
        return value, keys, model.calls, cb.metric

    v_pad, keys_pad, calls, metric = run(padded, 8)
    v_clean, keys_clean, _, _ = run(clean, 5)
    assert keys_pad == keys_clean == ["a", "b", "c", "d", "e"]
    assert calls[:4] == [2, 2, 2, 2]  # padding is still generated: every rank makes the same calls
    assert int(metric.real_n) == int(metric.fake_n) == 5
    assert v_pad == pytest.approx(v_clean, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------------- prediction writer
def test_prediction_writer_writes_each_key_once(tmp_path):
    from vidgen.callbacks.prediction_writer import PredictionWriter

    w = PredictionWriter(output_dir=str(tmp_path), grids=True, npz=True)
    trainer = SimpleNamespace(global_rank=0, world_size=1, default_root_dir=str(tmp_path))
    w.on_predict_epoch_start(trainer, None)
    g = torch.Generator().manual_seed(5)
    vids = torch.rand(4, 3, 2, 8, 8, generator=g) * 2 - 1
    batches = [({"key": ["a", "b", "a", "b"], "valid": torch.tensor([True, True, False, False])},
                {"videos": vids, "keys": ["a", "b", "a", "b"], "labels": torch.tensor([1, 2, 1, 2])}),
               ({"key": ["a"] * 4, "valid": torch.zeros(4, dtype=torch.bool)},  # padding only
                {"videos": vids, "keys": ["a"] * 4, "labels": torch.tensor([1, 1, 1, 1])}),
               ({"key": ["c", "d"]}, {"videos": vids[:2], "keys": ["c", "d"], "labels": torch.tensor([3, 4])})]
    for i, (batch, pred) in enumerate(batches):
        w.write_on_batch_end(trainer, None, pred, None, batch, i, 0)
    w.on_predict_epoch_end(trainer, None)
    with np.load(tmp_path / "samples.npz") as z:
        assert z["keys"].tolist() == ["a", "b", "c", "d"] and z["labels"].tolist() == [1, 2, 3, 4]
        assert z["videos"].shape[0] == 4
    assert sorted(p.name for p in tmp_path.glob("*.mp4") if not p.name.startswith("grid")) == \
        ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    assert not (tmp_path / "grid_r0_00001.png").exists()
    with pytest.raises(ValueError, match="row i"):
        w.write_on_batch_end(trainer, None, {"videos": vids, "keys": list("abcd")},
                             None, {"valid": torch.tensor([True, False])}, 9, 0)
