"""The 2D-VQ recipes are the per-frame layouts of the 3D-VQ recipes they inflate into (MAGVIT §3.1), and the demo's
tokenizer stage trains the 2D one first and hands its checkpoint to the 3D one as ``init_from_2d``."""

import os
import types

import yaml

from cliutil import ROOT

PAIRS = [("configs/magvit/tokenizer_2d.yaml", "configs/magvit/tokenizer_ucf101.yaml"),
         ("configs/magvit/tokenizer_2d_tiny.yaml", "configs/magvit/tokenizer_ucf101_tiny.yaml")]


def _args(path):
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)["model"]["init_args"]


def test_the_2d_recipes_are_their_3d_recipes_per_frame():
    for p2, p3 in PAIRS:
        a2, a3 = _args(p2), _args(p3)
        assert a2["arch"]["dims"] == 2 and a3["arch"].get("dims", 3) == 3, (p2, p3)
        same = {k: v for k, v in a3["arch"].items() if k != "dims"}
        assert {k: a2["arch"].get(k) for k in same} == same, f"{p2} is not the per-frame layout of {p3}"
        assert a2["bottleneck"] == a3["bottleneck"], (p2, p3)   # the codebook is copied as it is
        assert "init_from_2d" in a3 and p2 in open(os.path.join(ROOT, p3)).read(), f"{p3} does not name {p2}"


def test_the_demo_tokenizer_stage_inflates_its_2d_phase(monkeypatch):
    from vidgen.demos import tokenizer as stage

    calls = []

    def fake(ctx, config, subdir, title, init_from_2d=None, report=True):
        calls.append((config.name, subdir, init_from_2d, report))
        if not report:
            return {"checkpoint": "/x/image_2d.ckpt", "psnr_curve": [(400, 1.0, 20.0)], "seconds": 1.0, "steps": 400}
        return {"summary": "3d", "checkpoint": "/x/3d.ckpt"}

    monkeypatch.setattr(stage, "train_and_report", fake)
    res = stage.run(types.SimpleNamespace())
    assert [c[0] for c in calls] == ["tokenizer_2d_tiny.yaml", "tokenizer_ucf101_tiny.yaml"]
    assert calls[1][2] == "/x/image_2d.ckpt" and calls[0][3] is False
    assert res["checkpoint"] == "/x/3d.ckpt" and res["image_2d"]["checkpoint"] == "/x/image_2d.ckpt"


def test_a_recipe_with_fewer_frames_trains_on_random_windows_of_the_clips():
    """The per-frame recipes (num_frames 1) and short 3D windows see a random window of each decoded clip, as the
    datamodule's random clip offset gives them under `vidgen fit`, not always the clip's first frames."""
    import torch

    from vidgen.demos.tokenizer import random_windows

    clips = torch.arange(6 * 8, dtype=torch.float32).view(6, 1, 8, 1, 1).expand(6, 3, 8, 2, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_windows(clips, 8, g), clips)
    starts = set()
    for _ in range(20):
        w = random_windows(clips, 3, g)
        assert w.shape == (6, 3, 3, 2, 2)
        for b in range(6):
            s = int(w[b, 0, 0, 0, 0]) - b * 8           # frame index of the window's first frame in clip b
            assert 0 <= s <= 5 and torch.equal(w[b], clips[b, :, s:s + 3])
            starts.add(s)
    assert starts == set(range(6))                        # every offset occurs


def test_the_per_frame_demo_recipes_train_on_single_frames_of_many_clips():
    for path in ("configs/magvit/tokenizer_2d_tiny.yaml", "configs/latte/vae_tiny.yaml"):
        with open(os.path.join(ROOT, path)) as f:
            data = yaml.safe_load(f)["data"]["init_args"]
        # one frame of each of many clips (consecutive frames are near-duplicates); 8 a step is the 2D-VQ's since
        # session 13 (it learns more per CPU-second than 16: configs/magvit/tokenizer_2d_tiny.yaml)
        assert data["num_frames"] == 1 and data["batch_size"] >= 8, path


class _Stop(Exception):
    """Raised where a stage asks for its clips: the clip length is known by then, nothing is trained."""


class _WindowTokenizer:
    """A stand-in for the 3D-VQ tokenizer checkpoint: trained on 4-frame windows, by every name a stage could read."""

    num_frames = 4
    resolution = 32
    codebook_size = 16
    hparams = {"num_frames": 4, "resolution": 32}
    config = types.SimpleNamespace(num_frames=4, resolution=32)

    def __init__(self, seen):
        self.seen = seen

    def token_shape(self, T, H, W):
        self.seen.append(("token_shape", T))
        return (T, H, W)  # any grid the stages accept (videopoet_sr needs an HR grid height divisible by 8)


def test_token_space_stages_model_the_demo_clips_not_the_tokenizer_window(monkeypatch, tmp_path):
    """The 3D-VQ trains on 4-frame windows, but MAGVIT, the VideoPoet LM, SR and audio model the demo's 8-frame clips:
    given a tokenizer checkpoint whose ``num_frames`` is 4, each stage builds its token grid, its model and its clips
    for 8 frames (each stage is run up to where it loads its clips, MAGVIT up to where it builds its model)."""
    from vidgen.demos import common, magvit, videopoet, videopoet_audio, videopoet_sr
    from vidgen.lightning_modules import magvit as magvit_model
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    with open(os.path.join(ROOT, "configs/magvit/tokenizer_ucf101_tiny.yaml")) as f:
        window = yaml.safe_load(f)["data"]["init_args"]["num_frames"]
    assert window == _WindowTokenizer.num_frames < common.CLIP_FRAMES == 8

    seen = []

    def load(ctx, split, num_frames, *a, **k):
        seen.append(("clips", num_frames))
        raise _Stop

    ckpt = tmp_path / "tokenizer.ckpt"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(VideoTokenizer, "load_frozen", classmethod(lambda cls, path, **k: _WindowTokenizer(seen)))
    monkeypatch.setattr(common, "load_clips", load)
    monkeypatch.setattr(videopoet_audio, "load_soundtracks", load)

    def masked_transformer(**kw):  # MAGVIT builds its model (for the clip length) before it loads the clips
        seen.append(("model", kw["num_frames"]))
        raise _Stop

    monkeypatch.setattr(magvit_model, "MaskedVideoTransformer", masked_transformer)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text('{"procedural_classes": 12}')
    for stage in (magvit, videopoet, videopoet_audio, videopoet_sr):
        seen.clear()
        ctx = types.SimpleNamespace(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), fast=True, seed=0,
                                    results={"tokenizer": {"checkpoint": str(ckpt)}}, log=lambda m: None)
        try:
            res = stage.run(ctx)
        except _Stop:
            res = None
        assert res is None, f"{stage.__name__} returned before loading its clips: {res}"
        assert {w for w, _ in seen} & {"clips", "model"} and all(T == 8 for _, T in seen), (stage.__name__, seen)
