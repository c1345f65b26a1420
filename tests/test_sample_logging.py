"""VideoSampleLogger (mp4 + png + TensorBoard, deterministic for a fixed seed and fixed weights) and ThroughputMonitor."""

import os

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vidgen.callbacks.samples import VideoSampleLogger
from vidgen.callbacks.throughput import VideoThroughputMonitor, tokens_in_batch
from vidgen.datamodules.video import VideoDataModule
from vidgen.lightning_modules.stream_probe import StreamProbe
from shardgen import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("samp")
    write_shards(str(root / "train"), n_shards=2, per_shard=4, frames=8, prefix="tr", caption=False)
    write_shards(str(root / "val"), n_shards=1, per_shard=4, frames=8, prefix="va", caption=False, seed=50)
    return str(root / "train"), str(root / "val")


class NoisyProbe(StreamProbe):
    """Reconstruction plus generator-drawn noise: the output depends on the seed, as a sampler's does."""

    def __init__(self, lr=0.0, **kw):
        super().__init__(channels=4, lr=lr, **kw)
        self.gen_inputs = []

    @torch.no_grad()
    def generate(self, batch=None, num_samples=None, generator=None):
        self.gen_inputs.append(list(batch["key"]))
        out = super().generate(batch, num_samples)
        noise = torch.randn(out.shape, generator=generator).to(out)
        return (out + 0.3 * noise).clamp(-1, 1)


def _dm(shards, val=True):
    tr, va = shards
    return VideoDataModule(train_shards=tr, val_shards=va if val else None, seed=1, num_frames=4, resolution=16,
                           batch_size=2, num_workers=0, crop="center")


def _trainer(tmp_path, steps, callbacks, logger):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     default_root_dir=str(tmp_path), limit_val_batches=0, num_sanity_val_steps=0,
                     log_every_n_steps=1)


def _tb_images(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"images": 0})
    acc.Reload()
    return {e.step: e.encoded_image_string for e in acc.Images(tag)}


def test_samples_are_written_and_deterministic(shards, tmp_path):
    torch.manual_seed(0)
    model = NoisyProbe(lr=0.0)  # weights never change -> every log must show the same pixels
    cb = VideoSampleLogger(every_n_steps=2, num_samples=2, fps=4, seed=7)
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="", version="tb")
    _trainer(tmp_path, 4, [cb], tb).fit(model, datamodule=_dm(shards))

    assert cb._source == "val"
    assert len(model.gen_inputs) == 2 and model.gen_inputs[0] == model.gen_inputs[1]
    assert all(k.startswith("va-") for k in model.gen_inputs[0]), "conditioning comes from the val shards"
    out = tmp_path / "samples"
    for step in (2, 4):
        for ext in ("mp4", "png"):
            assert (out / f"step{step:08d}.{ext}").stat().st_size > 0
    assert (out / "step00000002.png").read_bytes() == (out / "step00000004.png").read_bytes()
    from vidgen.datamodules.media import read_video

    a, b = (np.asarray(read_video(str(out / f"step{s:08d}.mp4"))) for s in (2, 4))
    assert a.shape[0] == 4 and np.array_equal(a, b)
    imgs = _tb_images(str(tmp_path / "tb"), "samples/video")
    assert sorted(imgs) == [2, 4] and imgs[2] == imgs[4] and len(imgs[2]) > 0

    # another seed gives other samples; the same seed the same ones
    batch_gen = lambda seed: NoisyProbe.generate(model, cb._batch, 2, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(batch_gen(7), batch_gen(7)) and not torch.equal(batch_gen(7), batch_gen(8))


def test_train_batch_conditioning_and_ema(shards, tmp_path):
    from vidgen.callbacks.ema import EMA, ema_weights

    torch.manual_seed(0)
    model = NoisyProbe(lr=0.05)
    cb = VideoSampleLogger(every_n_steps=3, num_samples=1, seed=0, conditioning="auto")
    ema = EMA(decay=0.5)
    _trainer(tmp_path, 3, [ema, cb], False).fit(model, datamodule=_dm(shards, val=False))
    assert cb._source == "train" and cb._batch["video"].shape[0] == 1
    assert (tmp_path / "samples" / "step00000003.png").exists()
    with ema_weights(model):
        want = NoisyProbe.generate(model, cb._batch, 1, torch.Generator().manual_seed(0))
    got = cb.generate(_trainer(tmp_path, 1, [], False), model)
    assert torch.allclose(got, want), "samples use the EMA weights"
    raw = NoisyProbe.generate(model, cb._batch, 1, torch.Generator().manual_seed(0))
    assert not torch.allclose(raw, want), "EMA and raw weights differ here, so the check above means something"


def test_throughput_monitor(shards, tmp_path):
    class TokProbe(NoisyProbe):
        def tokens_per_sample(self, batch):
            return 10

    mon = VideoThroughputMonitor(window_size=2)  # Lightning's ThroughputMonitor underneath
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    model = TokProbe(lr=0.01)
    _trainer(tmp_path, 4, [mon], csv).fit(model, datamodule=_dm(shards))
    m = mon.last_metrics
    clips, items = m["train/device/samples_per_sec"], m["train/device/items_per_sec"]
    assert clips > 0 and items == pytest.approx(10 * clips)
    assert model.flops_per_batch > 0  # counted on the first batch (forward + backward)
    assert m["train/device/flops_per_sec"] > 0
    assert 0 < m["perf/data_wait_fraction"] < 1 and m["perf/peak_memory_gb"] > 0
    with open(os.path.join(csv.log_dir, "metrics.csv")) as f:
        rows = list(__import__("csv").DictReader(f))
    # throughput, data wait and the training loss share one step axis (batches that stepped)
    steps = {k: {r["step"] for r in rows if r.get(k)} for k in ("perf/data_wait_fraction", "train/device/samples_per_sec")}
    assert steps["perf/data_wait_fraction"] and steps["perf/data_wait_fraction"] <= {str(s) for s in range(5)}
    assert steps["train/device/samples_per_sec"]
    # fallback: T*H*W / patch
    video = torch.zeros(2, 3, 4, 16, 16)
    plain = StreamProbe()
    assert tokens_in_batch(plain, {"video": video}) == 2 * 4 * 16 * 16
    plain.patch_size = 2
    assert tokens_in_batch(plain, {"video": video}) == 2 * 4 * 16 * 16 / 4
