"""Audio in the data path (VideoPoet §2.2, issue #16 §1): the soundtrack of exactly the sampled clip's time span,
resampled to the configured rate; the absent-audio policy; demo soundtracks; exact resume with audio on."""

import os
import tarfile

import numpy as np
import pytest
import torch

from shardgen import add, encode_mp4, ramp_video
from vidgen.datamodules import media
from vidgen.datamodules.decode import ClipSpec, SkipSample, decode_sample

FPS, RATE = 8, 8000


def _index_wav(n: int, rate: int) -> tuple[np.ndarray, bytes]:
    """A track whose every sample is distinct (16-bit exact): sample i reads back as its own index."""
    x = ((np.arange(n) % 30000) - 15000).astype(np.float32) / 32767
    return x, media.encode_audio_wav(x, rate)


def _pcm(x: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(x) * 32767).astype(np.int64)


@pytest.mark.parametrize("offset_u", [0.0, 0.37, 0.99])
def test_clip_gets_exactly_its_samples(offset_u):
    """A clip starting at frame f (time f / fps) gets samples [f / fps * rate, + num_frames / fps * rate)."""
    frames = 20
    video = encode_mp4(ramp_video(frames), FPS)
    x, wav = _index_wav(frames * RATE // FPS, RATE)
    spec = ClipSpec(num_frames=6, height=24, width=32, audio_rate=RATE)
    out = decode_sample("k", {"mp4": video, "wav": wav}, spec, _Fixed(offset_u))
    start_frame = int(np.floor(offset_u * (frames - 6 + 1)))
    got = out["audio"].numpy()
    per_frame = RATE // FPS
    assert got.shape == (1, 6 * per_frame)
    np.testing.assert_array_equal(_pcm(got[0]), _pcm(x[start_frame * per_frame:(start_frame + 6) * per_frame]))
    assert out["has_audio"] is True


class _Fixed:
    """An rng whose first draws give a chosen clip offset (and no flip / centre-ish crop)."""

    def __init__(self, u):
        self.u = u

    def random(self, n):
        return np.array([self.u] + [0.5] * (n - 1))


def test_eval_clip_window_and_frame_stride():
    """Eval (middle clip) with a frame stride: the window spans num_frames * stride frames from the first index."""
    frames, stride = 30, 2
    x, wav = _index_wav(frames * RATE // FPS, RATE)
    spec = ClipSpec(num_frames=5, frame_stride=stride, height=24, width=32, audio_rate=RATE)
    out = decode_sample("k", {"mp4": encode_mp4(ramp_video(frames), FPS), "wav": wav}, spec, None)
    span = (5 - 1) * stride + 1
    start = (frames - span) // 2
    per = RATE // FPS
    np.testing.assert_array_equal(_pcm(out["audio"][0]), _pcm(x[start * per:(start + 5 * stride) * per]))


@pytest.mark.parametrize("rate", [8000, 11025, 22050])
def test_resampling_keeps_duration_and_pitch(rate):
    """A 16 kHz 440 Hz tone read at another rate: round(duration * rate) samples, still 440 Hz, phase-aligned."""
    sr, f = 16000, 440.0
    t = np.arange(3 * sr) / sr
    wav = media.encode_audio_wav(0.5 * np.sin(2 * np.pi * f * t), sr)
    got, r = media.read_audio(wav, 1.0, 1.0, rate)
    assert r == rate and got.shape == (1, rate)
    want = 0.5 * np.sin(2 * np.pi * f * (1.0 + np.arange(rate) / rate))
    assert np.abs(got[0, 200:-200] - want[200:-200]).max() < 0.01


def test_mp4_soundtrack_is_aligned_through_aac():
    """A tone that starts at 0.5 s, muxed as AAC into the mp4 and read back at another rate, starts at 0.5 s."""
    sr = 16000
    t = np.arange(int(2.125 * sr)) / sr
    tone = (0.5 * np.sin(2 * np.pi * 523.25 * t) * (t >= 0.5)).astype(np.float32)
    frames = ramp_video(17)
    mp4 = media.encode_video(frames, FPS, layout="thwc", audio=tone, sample_rate=sr)
    np.testing.assert_array_equal(media.read_video(mp4), media.read_video(media.encode_video(frames, FPS, layout="thwc")))
    got, _ = media.read_audio(mp4, 0.25, 1.0, RATE)
    onset = int(np.argmax(np.abs(got[0]) > 0.1))
    assert abs(onset - 0.25 * RATE) <= 2  # AAC priming is compensated: within 2 samples (0.25 ms)


def test_absent_and_silent_audio_follow_the_policy():
    video = encode_mp4(ramp_video(10), FPS)
    n = 4 * RATE // FPS
    spec = ClipSpec(num_frames=4, height=24, width=32, audio_rate=RATE)
    out = decode_sample("k", {"mp4": video}, spec, None)  # no track: silence and the flag
    assert out["has_audio"] is False and out["audio"].shape == (1, n) and not out["audio"].any()
    silent = media.encode_audio_wav(np.zeros(10 * RATE // FPS, np.float32), RATE)
    out = decode_sample("k", {"mp4": video, "wav": silent}, spec, None)  # a silent track is audio
    assert out["has_audio"] is True and not out["audio"].any()
    png = {"png": media.encode_image(ramp_video(1)[0])}
    still = decode_sample("k", png, ClipSpec(num_frames=4, fps=FPS, height=24, width=32, audio_rate=RATE), None)
    assert still["has_audio"] is False and still["audio"].shape == (1, int(round(4 / FPS * RATE)))
    skip = ClipSpec(num_frames=4, height=24, width=32, audio_rate=RATE, audio_policy="skip")
    for raw in ({"mp4": video}, png):
        with pytest.raises(SkipSample) as e:
            decode_sample("k", raw, skip, None)
        assert e.value.reason == "no_audio"
    with pytest.raises(SkipSample) as e:  # a broken audio member is a broken sample, not silence
        decode_sample("k", {"mp4": video, "wav": b"RIFF\x00\x00"}, spec, None)
    assert e.value.reason == "corrupt"
    # a short video looped to the clip: the window starts at 0 and the audio past the track is silence
    x, wav = _index_wav(3 * RATE // FPS, RATE)
    out = decode_sample("k", {"mp4": encode_mp4(ramp_video(3), FPS), "wav": wav}, spec, None)
    a = _pcm(out["audio"][0])
    np.testing.assert_array_equal(a[: len(x)], _pcm(x))
    assert not a[len(x):].any()


def _audio_shards(d, n=8):
    os.makedirs(d, exist_ok=True)
    url = os.path.join(d, "shard-000000.tar")
    sr = 16000
    with tarfile.open(url, "w") as tf:
        for k in range(n):
            t = np.arange(12 * sr // FPS) / sr
            tone = (0.3 * np.sin(2 * np.pi * (200 + 50 * k) * t)).astype(np.float32)
            mp4 = media.encode_video(ramp_video(12, seed=k), FPS, layout="thwc", audio=tone if k % 3 else None,
                                     sample_rate=sr)
            add(tf, f"{k:06d}.mp4", mp4)
            add(tf, f"{k:06d}.cls", str(k % 2).encode())
    return d


def test_datamodule_batches_audio_and_resumes_exactly(tmp_path):
    """batch['audio'] [B, 1, S] and has_audio; the state after 3 batches resumes the same audio stream."""
    from vidgen.datamodules.video import DataConfigError, VideoDataModule

    d = _audio_shards(str(tmp_path / "s"))
    kw = dict(train_shards=d, seed=3, num_frames=4, fps=FPS, resolution=16, batch_size=2, num_workers=0,
              audio_rate=RATE, resampled=True)
    dm = VideoDataModule(**kw)
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(6)]
    assert batches[0]["audio"].shape == (2, 1, 4 * RATE // FPS) and batches[0]["audio"].dtype == torch.float32
    flags = torch.cat([b["has_audio"] for b in batches])
    assert flags.dtype == torch.bool and flags.any() and not flags.all()
    for b in batches:  # silent where there is no track
        assert not b["audio"][~b["has_audio"]].any() and b["audio"][b["has_audio"]].abs().amax(-1).min() > 0.1
    dm2 = VideoDataModule(**kw)
    dm_state = VideoDataModule(**kw)
    it = iter(dm_state.train_dataloader())
    for _ in range(3):
        next(it)
    dm2.load_state_dict(dm_state.state_dict())
    it2 = iter(dm2.train_dataloader())
    for b in batches[3:]:
        r = next(it2)
        assert r["key"] == b["key"]
        torch.testing.assert_close(r["audio"], b["audio"], rtol=0, atol=0)
    with pytest.raises(DataConfigError, match="audio_rate"):
        VideoDataModule(train_shards=d, seed=0, audio_rate=8000, fps_range=[2.0, 8.0])


def test_demo_soundtracks_name_the_shape_and_follow_the_motion():
    from vidgen import demo_data as dd

    rng = np.random.default_rng(0)
    peaks = {}
    for shape in dd.DEMO_SHAPES:
        frames, params = dd.render_moving_shape(shape, "red", "up", np.random.default_rng(1))
        x = dd.procedural_soundtrack(params)
        assert x.shape == (int(dd.DEMO_FRAMES / dd.DEMO_FPS * dd.DEMO_AUDIO_RATE),)
        half = len(x) // 2
        spec = [np.abs(np.fft.rfft(x[s:s + half])) for s in (0, half)]
        f = [np.argmax(s) * dd.DEMO_AUDIO_RATE / half for s in spec]
        assert f[1] > f[0], "moving up: the pitch rises"
        peaks[shape] = f[0]
    base = {s: dd.SHAPE_TONES[s][0] for s in dd.DEMO_SHAPES}
    for s in dd.DEMO_SHAPES:  # the pitch names the shape: nearest base tone
        assert min(base, key=lambda b: abs(np.log(peaks[s] / base[b]))) == s
    _, params = dd.render_moving_shape("circle", "red", "right", rng)
    x = dd.procedural_soundtrack(params)
    q = len(x) // 4
    assert np.abs(x[-q:]).max() > 1.5 * np.abs(x[:q]).max(), "moving right: louder"
