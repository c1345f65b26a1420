"""FVD: Fréchet distance vs scipy and closed forms, streaming float64 sums, DDP invariance, cache, CLI, callback."""

import contextlib
import json
import math
import os

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

import shardgen
from vidgen.callbacks.fvd import (FVD_PROTOCOL, FeatureStats, FrechetVideoDistance, FVDCallback, accumulate_source,
                           compute_real_stats, frechet_distance, preprocess_for_i3d, real_stats_path)


def scipy_frechet(mu1, s1, mu2, s2):
    """The usual formula (pytorch-fid / StyleGAN-V): complex sqrtm of S1 S2, real part of its trace."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _gaussians(d, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        a = rng.normal(size=(d, d))
        out += [rng.normal(size=d), a @ a.T / d + 0.05 * np.eye(d)]
    return out


@pytest.mark.parametrize("d,seed", [(8, 0), (48, 1), (128, 2)])
def test_frechet_distance_matches_scipy(d, seed):
    mu1, s1, mu2, s2 = _gaussians(d, seed)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_frechet_distance_from_features_matches_scipy():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 2.0
    b = rng.normal(size=(400, 64)) * 1.1 + 2.2
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    np.testing.assert_allclose(sa.sigma.numpy(), np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
    ref = scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma) == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_closed_form_singular_and_rotation():
    # commuting (diagonal) covariances, some eigenvalues exactly 0 (n < D in practice):
    # FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a = np.array([0.0, 0.0, 1.0, 4.0, 9.0, 0.25])
    b = np.array([0.0, 2.0, 1.0, 1.0, 16.0, 0.0])
    mu1, mu2 = np.arange(6.0), np.arange(6.0)[::-1].copy()
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # invariant under a joint rotation; round-off e in a zero eigenvalue costs sqrt(e) ~ 1e-8 (scipy alike)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, abs=1e-6)
    # identical singular Gaussians: exactly 0 up to round-off, never negative garbage
    s = np.diag(a)
    assert abs(frechet_distance(mu1, s, mu1, s)) < 1e-12


def test_fvd_of_identical_sets_is_zero():
    feats = torch.randn(64, 400, generator=torch.Generator().manual_seed(0)) * 3 + 1
    m = FrechetVideoDistance(num_features=400)
    m.update(feats, real=True)
    m.update(feats, real=False)
    assert abs(float(m.compute())) < 1e-7
    assert m.real_sum.dtype == m.real_outer.dtype == torch.float64


def test_streaming_sums_equal_one_shot():
    f = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    g = torch.randn(40, 16, generator=torch.Generator().manual_seed(2)) + 0.3
    one = FrechetVideoDistance(num_features=16)
    one.update(f, real=True)
    one.update(g, real=False)
    streamed = FrechetVideoDistance(num_features=16)
    for chunk in f.split(7):
        streamed.update(chunk, real=True)
    for chunk in g.split(3):
        streamed.update(chunk, real=False)
    ref = scipy_frechet(f.double().mean(0).numpy(), np.cov(f.double().numpy(), rowvar=False),
                        g.double().mean(0).numpy(), np.cov(g.double().numpy(), rowvar=False))
    assert float(one.compute()) == pytest.approx(ref, rel=1e-9)
    assert float(streamed.compute()) == pytest.approx(ref, rel=1e-9)


class TinyExtractor(nn.Module):
    """A fixed random feature net (deterministic weights) standing in for I3D on tiny clips: coarse content plus
    local gradient energy (what noise changes)."""

    feature_dim = 28

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.proj = nn.Parameter(torch.randn(16, 3 * 4 * 4 * 4, generator=g) / 8)

    def forward(self, x):
        content = torch.tanh(F.adaptive_avg_pool3d(x, (4, 4, 4)).flatten(1) @ self.proj.T)
        energy = F.adaptive_avg_pool3d((x[..., 1:] - x[..., :-1]).abs(), (1, 2, 2)).flatten(1)
        return torch.cat([content, energy], 1)


def _smooth_videos(n, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, 4, generator=g) * 1.6 - 0.8
    return F.interpolate(low, size=(16, 32, 32), mode="trilinear", align_corners=False)


def test_fvd_grows_monotonically_with_noise():
    real = _smooth_videos(48, 1)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(3))
    values = []
    for sigma in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
        m = FrechetVideoDistance(TinyExtractor(), resolution=32)
        m.update(real, real=True)
        m.update((real + sigma * noise).clamp(-1, 1), real=False)
        values.append(float(m.compute()))
    assert abs(values[0]) < 1e-8  # FVD(x, x) = 0 through the video path
    assert all(b > a for a, b in zip(values, values[1:])), values
    # another sample of the same distribution is closer than the noisiest set
    m = FrechetVideoDistance(TinyExtractor(), resolution=32)
    m.update(real, real=True)
    m.update(_smooth_videos(48, 2), real=False)
    assert 0 < float(m.compute()) < values[-1]


def test_preprocess_protocol():
    v = torch.linspace(-1.5, 1.5, 20).reshape(1, 1, 20, 1, 1).expand(2, 1, 20, 8, 12)
    x = preprocess_for_i3d(v)
    assert x.shape == (2, 3, 16, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0, 1, 5], v[0, 0, 5, 0, 0].clamp(-1, 1).expand(224, 224))  # first 16 frames
    with pytest.raises(ValueError, match="T=8"):
        preprocess_for_i3d(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        preprocess_for_i3d(torch.zeros(3, 16, 32, 32))


# ------------------------------------------------------------------------------------------- DDP invariance
def _ddp_worker(rank, world, init_file, out_dir, shard_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _write_results(rank, world, out_dir, shard_dir)
    finally:
        torch.distributed.destroy_process_group()


def _write_results(rank, world, out_dir, shard_dir):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(37, 12, generator=g), torch.randn(29, 12, generator=g) * 1.3 + 0.2
    m = FrechetVideoDistance(num_features=12)
    m.update(real[rank::world], real=True)
    m.update(fake[rank::world], real=False)
    res = {"features": float(m.compute())}
    fixed = FrechetVideoDistance(num_features=12, real_stats=FeatureStats.from_features(real))
    fixed.update(fake[rank::world], real=False)
    res["fixed_real"] = float(fixed.compute())
    stats = compute_real_stats(shard_dir, TinyExtractor(), num_samples=7, batch_size=2, cache=False)
    res["shards_n"], res["shards_sum"] = stats.n, stats.total.tolist()
    with open(os.path.join(out_dir, f"{world}_{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    shardgen.write_shards(str(d), 2, 5, frames=18, corrupt={3}, seed=0)
    return str(d)


@pytest.mark.distributed
def test_ddp_two_processes_match_one(tmp_path, shard_dir):
    _write_results(0, 1, str(tmp_path), shard_dir)
    # fork (Linux) keeps the children from re-importing torch/lightning; spawn elsewhere
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), shard_dir),
                                          nprocs=2, start_method=method)
    one = json.load(open(tmp_path / "1_0.json"))
    for rank in (0, 1):
        two = json.load(open(tmp_path / f"2_{rank}.json"))
        assert two["features"] == pytest.approx(one["features"], rel=1e-12)
        assert two["fixed_real"] == pytest.approx(one["fixed_real"], rel=1e-12)
        assert two["shards_n"] == one["shards_n"] == 6  # first 7 clips, one corrupt
        np.testing.assert_allclose(two["shards_sum"], one["shards_sum"], rtol=1e-5)  # per-rank CPU float32 conv


# ------------------------------------------------------------------------------------------- cache, CLI, callback
def test_real_stats_cache_keyed_and_reused(tmp_path, shard_dir, monkeypatch):
    ext = TinyExtractor()
    p = real_stats_path(shard_dir, 6, "tiny", tmp_path)
    assert p != real_stats_path(shard_dir, 7, "tiny", tmp_path) != real_stats_path(shard_dir, 6, "other", tmp_path)
    s = compute_real_stats(shard_dir, ext, 6, cache=p, log=lambda m: None)
    assert p.is_file() and s.n == 5 and s.meta["protocol"] == FVD_PROTOCOL
    monkeypatch.setattr("vidgen.callbacks.fvd.accumulate_source", lambda *a, **k: pytest.fail("cache not used"))
    again = compute_real_stats(shard_dir, ext, 6, cache=p)
    torch.testing.assert_close(again.outer, s.outer, rtol=0, atol=0)


class FakeDetector(nn.Module):
    """Scripted stand-in with StyleGAN-V's call signature: cheap 400-d features of a 224x224 clip."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(400, 3 * 4 * 14 * 14, generator=torch.Generator().manual_seed(5)) / 50)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return torch.tanh(F.avg_pool3d(x, (4, 16, 16)).flatten(1) @ self.proj.T)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("det") / "i3d_torchscript.pt"
    torch.jit.script(FakeDetector()).save(str(p))
    return str(p)


def test_cli_fvd(tmp_path, shard_dir, detector_path, capsys):
    import av  # noqa: F401 - mp4 encoding for the fake directory

    from vidgen import fvd as cli

    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    for i in range(4):
        (fake_dir / f"{i:03d}.mp4").write_bytes(shardgen.encode_mp4(shardgen.ramp_video(17, seed=10 + i)))
    args = ["--real", shard_dir, "--fake", str(fake_dir), "--i3d", detector_path, "--num-samples", "4",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    value = float(out.out.strip().split()[-1])
    assert math.isfinite(value) and value > 0
    assert len(list((tmp_path / "cache").glob("real_*_n4.npz"))) == 1
    assert cli.main(args) == 0  # second run: cached real statistics, same value
    assert float(capsys.readouterr().out.strip().split()[-1]) == pytest.approx(value, rel=1e-12)
    # FVD of the real shards against themselves is ~0
    assert cli.main(["--real", shard_dir, "--fake", shard_dir, "--i3d", detector_path, "--num-samples", "4",
                     "--no-cache", "--device", "cpu"]) == 0
    assert abs(float(capsys.readouterr().out.strip().split()[-1])) < 1e-6


class Generator(L.LightningModule):
    def __init__(self, reconstruct=False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.reconstruct, self.calls = reconstruct, []

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate(self, batch=None, num_samples=None, generator=None):
        self.calls.append((batch is not None, num_samples, self.training))
        if self.reconstruct:
            return batch["video"]
        return torch.rand(num_samples, 3, 16, 24, 24, generator=generator) * 2 - 1


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=2)

    def val_dataloader(self):
        videos = _smooth_videos(6, 7)
        batches = [{"video": videos[i:i + 2], "key": [f"k{i}", f"k{i + 1}"]} for i in range(0, 6, 2)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


class EMA(L.Callback):
    entered = 0

    @contextlib.contextmanager
    def ema_weights(self, pl_module):
        EMA.entered += 1
        yield


def _trainer(cb, *extra):
    return L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     callbacks=[cb, *extra])


def test_callback_logs_fvd_against_cached_real_stats(tmp_path, shard_dir, detector_path):
    with pytest.raises(FileNotFoundError, match="convert-i3d"):
        FVDCallback(i3d_path=str(tmp_path / "nope.pt"), real_shards=shard_dir)
    cb = FVDCallback(every_n_steps=2, num_samples=4, real_shards=shard_dir, i3d_path=detector_path,
                     batch_size=3, pass_batches=False, cache_dir=str(tmp_path / "cache"))
    model = Generator()
    trainer = _trainer(cb, EMA())
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=2))
    fvd = trainer.callback_metrics["val/fvd"]
    assert math.isfinite(float(fvd)) and float(fvd) > 0 and cb.last_value == pytest.approx(float(fvd))
    assert model.calls == [(False, 3, False), (False, 1, False)] and EMA.entered == 1
    assert len(list((tmp_path / "cache").glob("real_*_n4.npz"))) == 1


def test_callback_reconstruction_fvd_of_perfect_tokenizer_is_zero(detector_path):
    cb = FVDCallback(every_n_steps=1, num_samples=5, i3d_path=detector_path, use_ema=False)
    model = Generator(reconstruct=True)
    _trainer(cb).fit(model, datamodule=Data())
    assert [c[:2] for c in model.calls[:3]] == [(True, 2), (True, 2), (True, 1)]
    assert abs(cb.last_value) < 1e-6
