"""FID over frames (issue 10 §3): closed forms through the frame path, the FID InceptionV3 (torch-fidelity, random
weights from a local file) and its protocol, 1 vs 2 processes, `vidgen eval --metrics fid`, EvalCallback."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardgen
from vidgen.callbacks.fvd import FeatureStats, accumulate_source, compute_real_stats, extractor_id, frechet_distance
from vidgen.callbacks.metrics import FID_PROTOCOL, FrameFID, fid_frames, load_fid_inception


class MeanColour(nn.Module):
    """uint8 frames [N, 3, H, W] -> their mean colour in uint8 units [N, 3] (exact on constant frames)."""

    def forward(self, x):
        assert x.dtype == torch.uint8  # the protocol feeds uint8 images
        return x.double().mean((2, 3)).float()


class PooledColour(nn.Module):
    """uint8 frames -> 4 x 4 average-pooled colours [N, 48] (a richer stand-in for the 1 vs 2 process test)."""

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.float() / 255, (4, 4)).flatten(1)


def _clips(values: np.ndarray, size=(6, 10)) -> torch.Tensor:
    """values uint8 [B, T, 3] -> constant-colour videos [B, 3, T, H, W] in [-1, 1] (on the uint8 grid)."""
    v = torch.from_numpy(values.astype(np.float32)) / 127.5 - 1
    return v.permute(0, 2, 1)[..., None, None].expand(-1, -1, -1, *size).contiguous()


def test_fid_closed_forms_through_the_frame_path():
    # 4 frames (2 clips x 2 frames) per side, channel k = c_k + a_k * h_k with h_k orthogonal +-1 columns of
    # zero mean (Hadamard): empirical mean c, unbiased covariance diag(a^2 * 4/3) exactly. A third frame per clip
    # lies beyond the protocol's frames and must not count.
    h = np.array([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]])
    c1, a1 = np.array([100, 120, 90]), np.array([10, 4, 0])
    c2, a2 = np.array([110, 117, 90]), np.array([3, 4, 6])
    outlier = np.full((2, 1, 3), 255)
    real = np.concatenate([(c1 + a1 * h).reshape(2, 2, 3), outlier], 1)
    fake = np.concatenate([(c2 + a2 * h).reshape(2, 2, 3), outlier], 1)
    expected = np.sum((c1 - c2) ** 2.0) + 4 / 3 * np.sum((a1 - a2) ** 2.0)  # |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    m = FrameFID(MeanColour(), num_features=3, num_frames=2)
    m.update(_clips(real), real=True)
    m.update(_clips(fake), real=False)
    assert float(m.real_n) == float(m.fake_n) == 4  # one feature row per frame, first 2 frames only
    assert float(m.compute()) == pytest.approx(expected, rel=1e-12)
    # a set with itself: 0; frames off the uint8 grid are rounded to it first (uint8 input), grey repeats to RGB
    m.reset()
    m.update(_clips(real), real=True)
    m.update(_clips(real) + 0.3 / 127.5, real=False)
    assert abs(float(m.compute())) < 1e-9
    grey = _clips(real)[:, :1]
    torch.testing.assert_close(fid_frames(grey, 2), fid_frames(grey.expand(-1, 3, -1, -1, -1), 2))
    torch.testing.assert_close(fid_frames(fid_frames(_clips(real), 2), 2), fid_frames(_clips(real), 2))
    with pytest.raises(ValueError, match="first 2 frames"):
        m.update(_clips(real)[:, :, :1], real=True)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    """torch-fidelity's FID InceptionV3 with random weights (no download: its loader is bypassed to build the
    file), He-initialised so that features vary between images."""
    from unittest import mock

    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", reason="pip install 'vidgen[fid]'")

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("random", ["2048"])
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_fid_inception_loads_strictly_and_sees_uint8_frames_at_their_own_size(inception_path, tmp_path):
    net = load_fid_inception(inception_path)
    assert extractor_id(net) == "inception-v3-pt_inception-2015-12-05" and not net.training
    sd = torch.load(inception_path, weights_only=True)
    sd.pop("fc.bias")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="fc.bias"):
        load_fid_inception(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_fid_inception(tmp_path / "missing.pth")
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 3, 20, 12, generator=g) * 2 - 1  # 2 clips, 3 frames, 20 x 12: no resize before the net
    m = FrameFID(net, num_frames=2)
    feats = m.features(video)
    u8 = ((video[:, :, :2] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 1, 3, 4).reshape(4, 3, 20, 12)
    with torch.no_grad():
        manual = net(u8)[0]
    torch.testing.assert_close(feats, manual)  # rows: clip-major, frame-minor
    assert feats.shape == (4, 2048) and feats.std(0).max() > 0
    # FID of a set with itself through the network is 0 (features vs the video path)
    m.update(feats, real=True)
    m.update(video, real=False)
    assert abs(float(m.compute())) < 1e-6
    assert m.protocol == FID_PROTOCOL.format(frames=2)


# ------------------------------------------------------------------------------------------- 1 vs 2 processes
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    shardgen.write_shards(str(d), 2, 5, frames=18, corrupt={3}, seed=0)
    return str(d)


def _results(rank, world, out_dir, shard_dir, npz):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(37, 12, generator=g), torch.randn(29, 12, generator=g) * 1.3 + 0.2
    m = FrameFID(num_features=12)
    m.update(real[rank::world], real=True)
    m.update(fake[rank::world], real=False)
    res = {"features": float(m.compute())}
    video = FrameFID(PooledColour(), num_features=48, num_frames=4)
    stats = compute_real_stats(shard_dir, video, num_samples=7, batch_size=2, cache=False)
    video.set_real_stats(stats)
    counts = accumulate_source(video, npz, False, 5, 2, rank, world)
    res.update(shards_n=stats.n, shards_sum=stats.total.tolist(), fake_used=counts["used"],
               video=float(video.compute()))
    with open(os.path.join(out_dir, f"{world}_{rank}.json"), "w") as f:
        json.dump(res, f)


def _worker(rank, world, init_file, out_dir, shard_dir, npz):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _results(rank, world, out_dir, shard_dir, npz)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_fid_two_processes_match_one(tmp_path, shard_dir):
    npz = str(tmp_path / "samples.npz")
    np.savez(npz, videos=np.random.default_rng(1).integers(0, 256, (6, 5, 8, 8, 3), dtype=np.uint8))
    _results(0, 1, str(tmp_path), shard_dir, npz)
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), shard_dir, npz),
                                          nprocs=2, start_method=method)
    one = json.load(open(tmp_path / "1_0.json"))
    assert one["shards_n"] == 6 * 4 and one["fake_used"] == 5  # first 7 clips, one corrupt; 4 frames each
    for rank in (0, 1):
        two = json.load(open(tmp_path / f"2_{rank}.json"))
        assert two["features"] == pytest.approx(one["features"], rel=1e-12)
        assert two["shards_n"] == one["shards_n"]
        np.testing.assert_allclose(two["shards_sum"], one["shards_sum"], rtol=1e-6)
        assert two["video"] == pytest.approx(one["video"], rel=1e-9)


# ------------------------------------------------------------------------------------------- CLI and callback
def test_eval_cli_fid_of_real_shards_against_themselves_is_zero(tmp_path, shard_dir, inception_path, capsys):
    from vidgen.eval import main

    stats = tmp_path / "fid_real.npz"
    args = ["--metrics", "fid", "--real", shard_dir, "--fake", shard_dir, "--inception", inception_path,
            "--fid-frames", "2", "--num-samples", "2", "--fid-real-stats", str(stats), "--device", "cpu",
            "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    out = json.load(open(tmp_path / "r.json"))["fid"]
    assert abs(out["value"]) < 1e-6 and out["n"] == 2 and out["protocol"] == FID_PROTOCOL.format(frames=2)
    saved = FeatureStats.load(stats)
    assert saved.n == 4 and saved.meta["protocol"] == out["protocol"] and saved.meta["clips"] == 2
    assert "FID " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--metrics", "fid", "--real", shard_dir, "--fake", shard_dir])
    assert "needs --inception" in capsys.readouterr().err


def test_eval_callback_fid_of_a_perfect_reconstruction_is_zero(inception_path):
    import lightning as L

    from vidgen.callbacks.metrics import EvalCallback

    class Tokenizer(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def generate(self, batch=None, num_samples=None, generator=None):
            return batch["video"][:num_samples]

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=2)

        def val_dataloader(self):
            v = torch.rand(2, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
            return torch.utils.data.DataLoader([{"video": v}], batch_size=None)

    cb = EvalCallback(every_n_steps=1, num_samples=2, inception_path=inception_path, fid_frames=2, use_ema=False)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[cb])
    trainer.fit(Tokenizer(), datamodule=Data())
    assert abs(cb.last_values["fid"]) < 1e-6 and "val/fid" in trainer.callback_metrics
