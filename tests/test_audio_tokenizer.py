"""SoundStream audio tokenizer (spec make_a_video_videopoet.md §2.2) and the audio tasks of VideoPoet (§2.5):
RVQ residuals shrink level by level, level-major token order round trip into the vocabulary's audio slots, causality,
50 latent frames per second, the tiny codec overfits, v2a writes its soundtrack into the mp4."""

import numpy as np
import pytest
import torch
from einops import rearrange

from vidgen.lightning_modules.nn.quantizers import ResidualVectorQuantizer
from vidgen.lightning_modules.soundstream import SoundStream, SoundStreamConfigError, reconstruction_quality
from vidgen.lightning_modules.videopoet import Vocabulary


def _tones(freqs, n, rate=8000, amp=0.4):
    t = torch.arange(n) / rate
    return torch.stack([amp * torch.sin(2 * torch.pi * f * t) for f in freqs])[:, None]


def test_rvq_residuals_shrink_level_by_level_on_unseen_data():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(levels=4, codebook_size=64, dim=8)
    mix = torch.randn(8, 8)  # correlated latents, like an encoder's
    a, b = (rearrange(torch.randn(16, 40, 8) @ mix, "b f d -> b d f") for _ in range(2))
    rvq.train()
    out = rvq(a)  # the first training call initialises the codebooks from a's residuals
    assert bool(rvq.initialized) and out.indices.shape == (16, 4, 40)
    norms = rvq.residual_norms(b)  # b was never seen
    assert all(x > y for x, y in zip(norms, norms[1:])), norms
    # the quantised sum is what the codes decode to, and encode() agrees with forward()
    torch.testing.assert_close(rvq.indices_to_latents(out.indices), out.latents)
    torch.testing.assert_close(rvq.encode(a), out.indices)
    # fewer levels: the coarser reconstruction is worse
    full = (rvq.indices_to_latents(rvq.encode(b)) - b).pow(2).mean()
    coarse = (rvq.indices_to_latents(rvq.encode(b)[:, :2]) - b).pow(2).mean()
    assert coarse > full


def test_codes_map_level_major_into_the_audio_slots():
    torch.manual_seed(0)
    codec = SoundStream(size="tiny", codebook_size=32, discriminator=False)
    codec.train()
    x = _tones([330, 523, 784], 17000)  # 2.125 s at 8 kHz
    codec.quantizer(codec.encoder(codec._check(x)))  # data init
    codec.eval()
    codes = codec.encode(x)
    assert codes.shape == (3, 4, 106), "2.125 s at 50 latent frames/s: 106 frames (§2.2), 4 levels"
    vocab = Vocabulary(visual_codes=64, audio_levels=4, audio_codes=32)
    ids = vocab.audio(codes)
    assert ids.shape == (3, 4 * 106)
    for lv in range(4):  # level-major: all level-l codes in one block, in that level's disjoint range
        lo, hi = vocab.range_of(f"audio:{lv}")
        block = ids[:, lv * 106:(lv + 1) * 106]
        assert bool(((block >= lo) & (block < hi)).all())
        torch.testing.assert_close(block - lo, codes[:, lv])
    back = rearrange(ids, "b (l f) -> b l f", l=4) - vocab.audio_offset - 32 * torch.arange(4)[None, :, None]
    torch.testing.assert_close(back, codes)
    assert int(ids.min()) >= vocab.audio_offset and int(ids.max()) < vocab.text_offset


def test_paper_rates_and_causality():
    assert SoundStream(size="16k", inference_only=True).hop == 320  # 16 kHz / 320 = 50 frames/s
    torch.manual_seed(0)
    m = SoundStream(size="tiny", codebook_size=16, discriminator=False)
    x = torch.randn(1, 1, 1600) * 0.1
    y = x.clone()
    y[..., 800:] = torch.randn(1, 1, 800)
    za, zb = m.encoder(x), m.encoder(y)
    assert za.shape[-1] == 10
    # frame f depends on samples before (f + 1) * hop only: frames 0..4 (samples < 800) are unchanged
    torch.testing.assert_close(za[..., :5], zb[..., :5])
    assert not torch.allclose(za[..., 5:], zb[..., 5:])
    with pytest.raises(SoundStreamConfigError, match="train_crop_seconds"):
        SoundStream(size="tiny", train_crop_seconds=0.01)


def test_tiny_codec_overfits_a_clip():
    """Waveform + multi-scale spectral loss on one 0.24 s demo-like tone drops at least 5x within the test budget
    (RVQ on, discriminator off). Two tones need more steps than a test may take (about 4x in 250 steps)."""
    torch.manual_seed(0)
    m = SoundStream(size="tiny", codebook_size=32, train_crop_seconds=None, discriminator=False)
    x = _tones([523.25], 2000)
    opt = torch.optim.Adam(m.parameters(), 3e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, OVERFIT_STEPS)
    m.train()
    first = last = None
    for i in range(OVERFIT_STEPS):
        loss, _, logs = m.generator_losses(x, i)
        rec = float(logs["wave_l1"] + logs["spectral"])
        first = rec if first is None else first
        last = rec if last is None or i < OVERFIT_STEPS - 10 else min(last, rec)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
    assert last < first / 5, (first, last)
    m.eval()
    q = reconstruction_quality(x, m.reconstruct(x))
    assert set(q) == {"snr_db", "log_spectral_distance_db"}


OVERFIT_STEPS = 250


def test_lightning_training_step_with_the_stft_discriminator():
    """Manual G/D optimisation runs through Lightning: both optimisers step, the codebooks are initialised."""
    import lightning as L

    torch.manual_seed(0)
    m = SoundStream(size="tiny", codebook_size=16, train_crop_seconds=0.25, disc_start_step=1, disc_ffts=[128, 64],
                    disc_filters=4, lr=1e-3)
    audio = _tones([330, 523, 784, 440], 4000)
    data = [{"audio": audio, "has_audio": torch.tensor([True, True, False, True])}] * 3
    d0 = [p.detach().clone() for p in m.discriminator.parameters()]
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert m.train_steps == 3 and bool(m.quantizer.initialized)
    assert any(not torch.equal(a, b) for a, b in zip(d0, m.discriminator.parameters())), "D never stepped"
    assert "train/g_adv" in trainer.logged_metrics and "train/loss_d" in trainer.logged_metrics


def test_v2a_predict_writes_the_soundtrack_into_the_mp4(tmp_path):
    """VideoPoet v2a: the sampled audio tokens stay in the audio slots; the prediction dict carries audio +
    sample_rate and the PredictionWriter muxes it into the clip's mp4."""
    from types import SimpleNamespace

    from vidgen.callbacks.prediction_writer import PredictionWriter
    from vidgen.datamodules import media
    from vidgen.lightning_modules.videopoet import VideoPoet, VideoPoetConfigError

    torch.manual_seed(0)
    codec = SoundStream(size="tiny", codebook_size=16, inference_only=True)
    lm = VideoPoet(size="tiny", visual_codes=32, audio_levels=4, audio_codes=16, text_dim=8, tasks={"v2a": 1.0},
                   audio_frames=6, num_frames=4, durations=[4])
    lm.attach_audio_tokenizer(codec)
    tokens = torch.randint(0, 32, (2, 2, 3, 3))
    audio, codes = lm.generate_audio({"tokens": tokens}, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 4, 6) and int(codes.min()) >= 0 and int(codes.max()) < 16
    assert audio.shape == (2, 1, 6 * codec.hop)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    lm.config.predict_task = "v2a"  # what `vidgen predict --task v2a` sets
    pred = lm.predict_step({"tokens": tokens, "video": video, "key": ["a", "b"]}, 0)
    assert pred["audio"].shape == (2, 1, 6 * codec.hop) and pred["sample_rate"] == 8000
    torch.testing.assert_close(pred["videos"], video)
    w = PredictionWriter(output_dir=str(tmp_path), grids=False, npz=False)
    w.write_on_batch_end(SimpleNamespace(global_rank=0), lm, pred, None, None, 0, 0)
    got = media.read_audio(str(tmp_path / "a.mp4"), 0.0, None, 8000)
    assert got is not None and got[0].shape[-1] >= 6 * codec.hop - 1100  # AAC frames: the whole soundtrack
    assert (tmp_path / "a.wav").exists()
    # audio-to-video: the prefix holds the audio tokens, the sampled video tokens stay in the visual slots
    lm_a2v = VideoPoet(size="tiny", visual_codes=32, audio_levels=4, audio_codes=16, text_dim=8, tasks={"a2v": 1.0},
                       num_frames=4, durations=[4])
    out = lm_a2v.sample("a2v", 2, (2, 3, 3), batch={"audio_tokens": codes}, generator=torch.Generator().manual_seed(1))
    assert out["tokens"].shape == (2, 2, 3, 3) and int(out["tokens"].max()) < 32
    seq = out["sequence"]
    ids = lm_a2v.vocab.audio(codes)
    assert any(torch.equal(seq[0, i:i + ids.shape[1]], ids[0]) for i in range(seq.shape[1] - ids.shape[1] + 1))
    # a batch without audio tokens (a clip without a soundtrack) trains a task that needs none, or says why not
    both = VideoPoet(size="tiny", visual_codes=32, audio_levels=4, audio_codes=16, text_dim=8,
                     tasks={"v2a": 1.0, "uncond": 1.0}, num_frames=4, durations=[4])
    assert {both.task_at(s, "video", audio=False).name for s in range(20)} == {"uncond"}
    assert {both.task_at(s, "video").name for s in range(20)} == {"uncond", "v2a"}
    with pytest.raises(ValueError, match="audio-required"):
        lm.step_loss({"tokens": tokens}, 0)
    with pytest.raises(VideoPoetConfigError, match="audio_codes"):
        VideoPoet(size="tiny", visual_codes=32, audio_codes=32, text_dim=8).attach_audio_tokenizer(codec)


def test_tokenize_writes_the_clips_audio_tokens():
    from vidgen.tokenize import _audio_tokens

    torch.manual_seed(0)
    codec = SoundStream(size="tiny", codebook_size=16, inference_only=True)
    group = [{"audio": _tones([330], 1700)[0], "has_audio": True}, {"audio": torch.zeros(1, 1700), "has_audio": False}]
    info = {"clips_without_audio": 0}
    out = _audio_tokens(group, codec, info)
    import io
    arr = np.load(io.BytesIO(out[0]["audio.npy"]))
    assert arr.shape == (4, 10) and arr.dtype == np.int16 and out[1] == {} and info["clips_without_audio"] == 1
    np.testing.assert_array_equal(arr, codec.encode(group[0]["audio"][None])[0].numpy())
