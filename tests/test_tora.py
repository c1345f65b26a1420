"""Tora (spec latte_tora.md §4): displacement maps, colour wheel, sparse sampling, TrajError, extractor and fusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen.lightning_modules.nn.trajectory import (
    TrajError,
    displacement_maps,
    flow_visualisation,
    gaussian_kernel,
    load_trajectory_json,
    sample_sparse_trajectories,
    traj_error,
)
from vidgen.lightning_modules.tora import (
    FUSERS,
    FuserConfig,
    TrajectoryExtractor,
    build_fuser,
)


# ---------------------------------------------------------------------------------------------- displacement maps
def test_gaussian_kernel_centre_weight_one():
    k = gaussian_kernel(99, 10.0)
    assert k.shape == (99, 99)
    assert k[49, 49].item() == 1.0 and k.max().item() == 1.0
    # isotropic exp(-r^2 / 2 sigma^2): one sigma away along an axis and along a diagonal
    assert k[49, 59].item() == pytest.approx(np.exp(-0.5), rel=1e-6)
    assert k[59, 59].item() == pytest.approx(np.exp(-1.0), rel=1e-6)


def test_straight_trajectory_map():
    """One trajectory moving 3 px right per frame: g[t+1] holds (3, 0) at p_t only; frame 0 is zero (§4.2)."""
    T, H, W = 6, 32, 48
    traj = np.stack([5.0 + 3 * np.arange(T), np.full(T, 10.0)], 1)
    g = displacement_maps(traj[None], H, W, blur=False)
    assert g.shape == (T, 2, H, W)
    assert g[0].abs().sum() == 0
    for t in range(T - 1):
        expect = torch.zeros(2, H, W)
        expect[0, 10, 5 + 3 * t] = 3.0
        torch.testing.assert_close(g[t + 1], expect)
    # two trajectories through the same point add up
    g2 = displacement_maps(np.stack([traj, traj]), H, W, blur=False)
    torch.testing.assert_close(g2, 2 * g)
    # the Gaussian with centre weight 1 keeps the value at the point and spreads exp(-r^2/200) around it
    gb = displacement_maps(traj[None], H, W)
    assert gb[0].abs().sum() == 0
    assert gb[1, 0, 10, 5].item() == pytest.approx(3.0, rel=1e-5)
    assert gb[1, 0, 10, 15].item() == pytest.approx(3.0 * np.exp(-100 / 200), rel=1e-4)
    assert gb[1, 1].abs().max() == 0


def test_colour_wheel_range_and_normalisation():
    T, H, W = 4, 16, 16
    traj = np.stack([2.0 + 2 * np.arange(T), np.full(T, 8.0)], 1)
    g = displacement_maps(traj[None], H, W, blur=False)
    v = flow_visualisation(g)
    assert v.shape == (3, T, H, W)
    assert v.min() >= -1 and v.max() <= 1
    assert (v[:, 0] == 1).all()  # zero flow is white
    # normalised by the clip's maximum: scaling the flow does not change the picture
    torch.testing.assert_close(flow_visualisation(5 * g), v)
    assert not torch.equal(v[:, 1], v[:, 0])


def test_trajectory_json_canvas_and_interpolation():
    t = load_trajectory_json([[[0, 0], [128, 64], [256, 256]]], num_frames=5, width=64, height=32)
    assert t.shape == (1, 5, 2)
    np.testing.assert_allclose(t[0, 0], [0, 0])
    np.testing.assert_allclose(t[0, 2], [32, 8])   # the middle canvas point, rescaled to 64x32
    np.testing.assert_allclose(t[0, -1], [64, 32])
    with pytest.raises(ValueError, match="list of objects"):
        load_trajectory_json({"trajectories": []}, 5, 64, 32)


def test_sparse_sampling_deterministic_per_seed():
    rng = np.random.default_rng(0)
    flow = rng.normal(0, 2, size=(7, 2, 96, 128)).astype(np.float32)
    a = sample_sparse_trajectories(flow, 123)
    b = sample_sparse_trajectories(flow, 123)
    np.testing.assert_array_equal(a, b)
    c = sample_sparse_trajectories(flow, 124)
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert 1 <= a.shape[0] <= 16 and a.shape[1] == 8
    assert (a[..., 0] >= 0).all() and (a[..., 0] <= 127).all() and (a[..., 1] >= 0).all() and (a[..., 1] <= 95).all()
    # tracking with the rounded flow: constant flow (2.4, -1) moves every point by (2, -1) per frame until clamped
    const = np.zeros((5, 2, 64, 64), np.float32)
    const[:, 0], const[:, 1] = 2.4, -1.0
    tr = sample_sparse_trajectories(const, 0, max_tracks=3)
    step = np.diff(tr, axis=1)
    assert np.all((step[..., 0] == 2) | (tr[:, 1:, 0] == 63)) and np.all((step[..., 1] == -1) | (tr[:, 1:, 1] == 0))


# ---------------------------------------------------------------------------------------------- TrajError
def _render_along(traj: np.ndarray, size: int = 64) -> torch.Tensor:
    from vidgen.demo_data import _coverage

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    rng = np.random.default_rng(0)
    bg = np.clip(rng.normal(40, 12, (size, size, 1)), 0, 255).astype(np.float32)  # static texture, as the demo
    frames = []
    for cx, cy in traj:
        a = _coverage("square", xx, yy, cx + 0.5, cy + 0.5, 7.0)[..., None]
        frames.append(bg * (1 - a) + np.array([230, 40, 40], np.float32) * a)
    v = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2) / 127.5 - 1
    return v


def test_traj_error_zero_along_trajectory_and_grows_when_shifted():
    T = 9
    traj = np.stack([16.0 + 3 * np.arange(T), 20.0 + 1.5 * np.arange(T)], 1)[None]
    video = _render_along(traj[0])
    s, n = traj_error(video, traj)
    assert n == T - 1 and s / n < 0.5
    errors = []
    for shift in (2.0, 4.0, 8.0):  # the given trajectory drifts away from the rendered one
        shifted = traj.copy()
        shifted[0, :, 0] += shift * np.arange(T) / (T - 1)
        s, n = traj_error(video, shifted)
        errors.append(s / n)
    assert errors[0] > 0.5 and errors[0] < errors[1] < errors[2]
    m = TrajError()
    m.update(video[None], [traj])
    assert m.compute().item() < 0.5


# ---------------------------------------------------------------------------------------------- extractor and fusers
def test_extractor_levels_and_token_grid():
    te = TrajectoryExtractor({"in_channels": 4, "channels": 16, "patch_size": 2, "res_blocks": 2, "levels": 3})
    f = te(torch.randn(2, 4, 3, 8, 12))
    assert len(f) == 3 and all(x.shape == (2 * 3, 16, 4, 6) for x in f)


@pytest.mark.parametrize("kind", FUSERS)
def test_fuser_identity_at_init_and_motion_reaches_output_after_update(kind):
    torch.manual_seed(0)
    B, T, hh, ww, d, c = 2, 3, 4, 5, 64, 16
    fuser = build_fuser(FuserConfig(kind=kind, groups=8, heads=4), d, c)
    h = torch.randn(B, T * hh * ww, d)
    f = torch.randn(B * T, c, hh, ww)
    torch.testing.assert_close(fuser(h, f, T=T, S=hh * ww), h, rtol=0, atol=0)
    # after one gradient step the motion features change the output (the zero init is not a dead end)
    opt = torch.optim.SGD(fuser.parameters(), lr=0.1)
    fuser(h, f, T=T, S=hh * ww).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(fuser(h, f, T=T, S=hh * ww), h)
        f2 = f.clone()
        f2[:B * T // 2] = 0
        assert not torch.allclose(fuser(h, f, T=T, S=hh * ww), fuser(h, f2, T=T, S=hh * ww))


# ---------------------------------------------------------------------------------------------- the Tora module
from vidgen.lightning_modules.tora import PLACEMENTS, Tora, ToraConfigError  # noqa: E402

TINY_TORA = dict(size="S/2", depth=2, hidden_size=32, num_heads=4, text_encoder={"kind": "minilm", "max_length": 8},
                 vae={"kind": "pixels", "factor": 4}, num_frames=5, resolution=16, sample_steps=2, warmup_steps=0,
                 fuser={"groups": 8, "heads": 4}, extractor={"channels": 8}, gaussian_size=7, gaussian_sigma=2.0)


def _line(x0, y0, dx, dy, T=5):
    return np.stack([x0 + dx * np.arange(T), y0 + dy * np.arange(T)], 1)


def _shape_clips(trajs: list[np.ndarray], size: int = 16) -> torch.Tensor:
    """Clips of a bright disc on a dark background whose centre follows each trajectory."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    clips = []
    for tr in trajs:
        frames = [np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0) * 2 - 1 for x, y in tr]
        clips.append(np.repeat(np.stack(frames)[None], 3, 0))
    return torch.from_numpy(np.stack(clips)).float()


def _batch(n: int = 2) -> dict:
    trajs = [_line(3, 3 + 4 * i, 2, 1) for i in range(n)]
    return {"video": _shape_clips(trajs), "text": ["a ball"] * n, "fps": torch.full((n,), 8.0),
            "trajectories": torch.from_numpy(np.stack([t[None] for t in trajs])).float()}


@pytest.mark.parametrize("kind,placement", [("adaptive_norm", "temporal"), ("extra_channel", "spatial"),
                                            ("cross_attention", "both")])
def test_tora_equals_its_base_model_at_init(kind, placement):
    torch.manual_seed(0)
    tora = Tora(**{**TINY_TORA, "fuser": {**TINY_TORA["fuser"], "kind": kind, "placement": placement}}).eval()
    batch = _batch()
    z = tora.latents(batch)
    kw = tora.model_kwargs(batch, z)
    assert ("motion" in kw) == (placement != "spatial") and ("motion_spatial" in kw) == (placement != "temporal")
    base_kw = {k: v for k, v in kw.items() if k not in ("motion", "motion_spatial")}
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        out, base = tora.model(z, t, **kw), tora.model(z, t, **base_kw)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    assert len(kw.get("motion", kw.get("motion_spatial"))) == tora.config.depth  # extractor levels = blocks
    with pytest.raises(ToraConfigError, match="fuser.placement"):
        Tora(**{**TINY_TORA, "fuser": {"placement": "everywhere"}})


def test_only_named_parameters_train_and_frozen_ones_stay_bit_identical():
    import lightning as L

    from vidgen.callbacks.curriculum import StagedCurriculum
    from vidgen.callbacks.ema import EMA, EMA_PREFIX

    torch.manual_seed(0)
    tora = Tora(**TINY_TORA, lr=1e-2)
    trainable = {n for n, p in tora.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.temporal_blocks.", "extractor.")) for n in trainable)
    assert any(".fuser." in n for n in trainable) and not any("spatial_blocks" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in tora.named_parameters()}
    batches = [_batch() for _ in range(3)]
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EMA(decay=0.9), StagedCurriculum([{"at_step": 0, "model": {"motion_mode": "dense"}},
                                                                      {"at_step": 2, "model": {"motion_mode": "sparse"}}])])
    trainer.fit(tora, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert tora.motion_mode == "sparse"  # switched by the curriculum at step 2 (§4.6)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for n, p in tora.named_parameters():
        if n in trainable:
            assert id(p) in opt_params
        else:
            assert id(p) not in opt_params and torch.equal(p, before[n]), n
    changed = {n for n in trainable if not torch.equal(before[n], dict(tora.named_parameters())[n])}
    assert any(".fuser." in n for n in changed) and any(n.startswith("extractor.") for n in changed)
    ema = {k[len(EMA_PREFIX):] for k in tora.state_dict() if k.startswith(EMA_PREFIX)}
    assert ema == trainable


def test_curriculum_switches_dense_to_sparse():
    from vidgen.callbacks.curriculum import CurriculumConfigError, StagedCurriculum

    tora = Tora(**TINY_TORA)
    assert tora.motion_mode == "dense"
    tora.set_curriculum_settings({"motion_mode": "sparse"})
    assert tora.motion_mode == "sparse"
    with pytest.raises(ToraConfigError, match="motion_mode"):
        tora.set_curriculum_settings({"motion_mode": "dots"})
    with pytest.raises(CurriculumConfigError, match="model must be a mapping"):
        StagedCurriculum([{"at_step": 0}, {"at_step": 5, "model": "sparse"}])
    # dense flow -> maps with a zero first frame, no filter; sparse trajectories sampled from the same flow
    flow = torch.zeros(1, 4, 2, 16, 16)
    flow[:, :, 0] = 2.0
    tora.motion_mode = "dense"
    g = tora.displacement({"flow": flow}, 1, 5, 16, 16)
    assert g.shape == (1, 5, 2, 16, 16) and g[0, 0].abs().sum() == 0 and torch.equal(g[0, 1:], flow[0])
    tora.motion_mode = "sparse"
    gs = tora.displacement({"flow": flow}, 1, 5, 16, 16)
    assert gs[0, 0].abs().sum() == 0 and 0 < (gs[0, 1, 0] > 0).float().mean() < 1


def test_tiny_tora_overfits_a_few_clips():
    torch.manual_seed(0)
    tora = Tora(**{**TINY_TORA, "hidden_size": 64, "fuser": {"groups": 8}, "trainable": [".*"], "lr": 3e-3,
                   "class_dropout_prob": 0.0, "cfg_scale": 1.0,
                   # 5-frame clips: Open-Sora's shift has T' = floor(5 / 17) * 5 = 0, which puts every t at 0
                   "use_timestep_transform": False})
    batch = _batch(3)
    y, mask = tora.encode_text(batch["text"])
    tora.encode_text = lambda texts: (y[: len(texts)], mask[: len(texts)])  # one caption: encode once
    opt = tora.configure_optimizers()

    def eval_loss():  # a fixed set of (t, noise)
        with torch.no_grad():
            return tora.loss_terms(batch, generator=torch.Generator().manual_seed(0))["loss"].mean().item()

    before = eval_loss()
    for _ in range(150):
        opt.zero_grad()
        tora.loss_terms(batch)["loss"].mean().backward()
        opt.step()
    after = eval_loss()
    assert after < before / 5, (before, after)


def test_datamodule_carries_trajectories_and_flow_through_the_clip(tmp_path):
    """Shards with traj.npy / flow.npy (as `vidgen trajectories` writes them): the batch's trajectories follow the
    clip's frames, crop and resize (the shape's centroid in the decoded frames is on them); missing ones are skipped."""
    import io
    import json

    from vidgen import media
    from vidgen.datamodules import VideoDataModule
    from vidgen.demo_data import render_moving_shape
    from vidgen.shards import ShardWriter

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    writer = ShardWriter(str(tmp_path / "s"), "traj")
    for i, direction in enumerate(("right", "down")):
        frames, p = render_moving_shape("square", "yellow", direction, np.random.default_rng(i), size=64, frames=17,
                                        noisy=False)
        start, end = np.array(p["start"]), np.array(p["end"])
        path = start + (end - start) * (np.arange(17)[:, None] / 16) - 0.5  # pixel-index coordinates
        flow = np.zeros((16, 2, 32, 32), np.float16)
        flow[:, 0], flow[:, 1] = (end - start) / 16 / 2  # stored at 32x32: displacements halved
        writer.write(f"c{i}", {"mp4": media.encode_video(frames, 8.0, layout="thwc", crf=10),
                               "json": json.dumps({"width": 64, "height": 64, "fps": 8.0}).encode(),
                               "traj.npy": npy(path[None].astype(np.float32)), "flow.npy": npy(flow)})
    writer.write("plain", {"mp4": media.encode_video(frames, 8.0, layout="thwc", crf=10)})
    writer.close()
    dm = VideoDataModule(val_shards=str(tmp_path / "s"), seed=0, num_frames=8, frame_stride=2, resolution=32,
                         crop="center", batch_size=2, num_workers=0, shuffle=False, motion=True)
    dm.setup("validate")
    b = next(iter(dm.val_dataloader()))
    assert b["trajectories"].shape == (2, 1, 8, 2) and b["flow"].shape == (2, 7, 2, 32, 32)
    for i in range(2):
        v = b["video"][i].float().mean(0)  # [T, H, W] brightness: the yellow square on a dark background
        w = (v > v.mean()).float()
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx = (w * xx).sum((1, 2)) / w.sum((1, 2))
        cy = (w * yy).sum((1, 2)) / w.sum((1, 2))
        torch.testing.assert_close(torch.stack([cx, cy], -1), b["trajectories"][i, 0], atol=0.6, rtol=0)
        step = b["trajectories"][i, 0, 1] - b["trajectories"][i, 0, 0]  # 2 source frames per clip frame
        torch.testing.assert_close(b["flow"][i, :, :, 5, 5], step.expand(7, 2), atol=1e-2, rtol=0)
    from vidgen.datamodules.decode import SkipSample, decode_sample

    with pytest.raises(SkipSample) as e:  # a clip without trajectories is skipped (counted as no_motion)
        decode_sample("plain", {"mp4": media.encode_video(frames, 8.0, layout="thwc")}, dm.spec, None)
    assert e.value.reason == "no_motion"


def test_trajectories_tool_filters_tracks_and_reports(tmp_path):
    """`vidgen trajectories`: a moving clip keeps traj.npy / flow.npy (read without pickle), a static clip is removed
    by the flow-score filter and an undecodable one is reported; the counts land in index.json."""
    import io
    import json
    import tarfile

    from vidgen import media
    from vidgen.demo_data import render_moving_shape
    from vidgen.shards import ShardWriter
    from vidgen.trajectories import build_parser, run

    writer = ShardWriter(str(tmp_path / "in"), "clips")
    moving, _ = render_moving_shape("circle", "red", "right", np.random.default_rng(0), size=64, frames=9, noisy=True)
    writer.write("moving", {"mp4": media.encode_video(moving, 8.0, layout="thwc", crf=10)})
    writer.write("static", {"mp4": media.encode_video(np.repeat(moving[:1], 9, 0), 8.0, layout="thwc", crf=10)})
    writer.write("broken", {"mp4": b"not a video"})
    writer.close()
    args = build_parser().parse_args(["--shards", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                      "--flow-size", "64", "--min-flow-score", "0.05", "--write-flow",
                                      "--stride", "8", "--no-progress"])
    res = run(args)
    assert res["kept"] == 1 and res["removed"] == {"static": 1, "unreadable": 1}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {s["reason"]: s["count"] for s in index["skipped"]} == {"static": 1, "unreadable": 1}
    tar = next((tmp_path / "out").glob("*.tar"))
    with tarfile.open(tar) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    traj = np.load(io.BytesIO(members["moving.traj.npy"]), allow_pickle=False)
    flow = np.load(io.BytesIO(members["moving.flow.npy"]), allow_pickle=False)
    assert traj.shape[1:] == (9, 2) and 1 <= traj.shape[0] <= 16 and flow.shape == (8, 2, 64, 64)
    meta = json.loads(members["moving.json"])
    assert meta["motion"]["flow_score"] > 0.05 and meta["motion"]["num_tracks"] == traj.shape[0]
    # same seed, same tracks
    args.out, args.overwrite = str(tmp_path / "out2"), False
    run(args)
    with tarfile.open(next((tmp_path / "out2").glob("*.tar"))) as tf:
        again = np.load(io.BytesIO(tf.extractfile("moving.traj.npy").read()), allow_pickle=False)
    np.testing.assert_array_equal(traj, again)
