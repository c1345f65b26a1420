"""Make-A-Video part 2 (spec make_a_video_videopoet.md §1.1, §1.4, §1.5): ↑F masks and its identity to D^t at init,
the SR stages' conditioning, shared noise and chunking, the cascade end to end, and tiny overfits."""

import pytest
import torch
from einops import rearrange, repeat

from vidgen.lightning_modules.clip import CLIP_SIZES
from vidgen.lightning_modules.make_a_video import MakeAVideoConfigError, MakeAVideoDecoder
from vidgen.lightning_modules.make_a_video_interp import (MaskedFrameInterpolation, animation_mask, blend_given,
                                                          extrapolation_mask, interpolated_length, interpolation_mask,
                                                          masked_frames, spread_frames)

CLIP = {"model_cfg": CLIP_SIZES["tiny"]}  # a random tiny CLIP (embed_dim 64): no checkpoint needed
UNET = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_head_channels=8,
            groups=4, num_cond_tokens=2)


def _randomise(module, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _overfit(loss_fn, params, steps, lr):
    opt = torch.optim.Adam(list(params), lr=lr)
    with torch.no_grad():
        first = float(loss_fn())
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        return first, float(loss_fn())


# ------------------------------------------------------------------------------------------------------------ ↑F
def test_interpolation_masks_and_frame_counts():
    assert interpolated_length(16, 5) == 76  # the paper's 16 -> 76 at frame skip 5
    keep = interpolation_mask(16, 5)
    assert keep.shape == (76,) and int(keep.sum()) == 16
    assert torch.equal(torch.nonzero(keep).flatten(), torch.arange(0, 76, 5))
    for n, k in [(8, 5), (4, 3), (5, 1), (3, 7)]:  # any skip works
        m = interpolation_mask(n, k)
        assert m.numel() == (n - 1) * k + 1 and int(m.sum()) == n and m[0] and m[-1]
    fut, past = extrapolation_mask(10, 3, "future"), extrapolation_mask(10, 3, "past")
    assert fut[:3].all() and not fut[3:].any() and past[-3:].all() and not past[:-3].any()
    anim = animation_mask(6)
    assert anim[0] and int(anim.sum()) == 1
    video = torch.randn(2, 3, 4, 5, 5)
    full, keep = spread_frames(video, 3)
    assert full.shape == (2, 3, 10, 5, 5) and torch.equal(full[:, :, ::3], video)
    assert torch.all(full[:, :, ~keep] == 0)
    cond = masked_frames(full, keep)  # masked RGB (zeros on masked frames) + 1 on masked frames
    assert cond.shape == (2, 4, 10, 5, 5)
    assert torch.equal(cond[:, :3], full) and torch.all(cond[:, 3, keep] == 0) and torch.all(cond[:, 3, ~keep] == 1)


def test_cond_fill_linear_puts_the_blend_of_the_given_frames_on_the_masked_ones():
    """cond_fill='linear' (not in the paper): each masked frame of the conditioning video holds the linear blend of
    the given frames around it, weighted by temporal distance; one-sided (extrapolation / animation): a copy of the
    nearest given frame; per-clip masks; the mask channel and the given frames are those of the zero fill."""
    g = torch.Generator().manual_seed(0)
    kept = torch.randn(2, 3, 3, 4, 4, generator=g)
    full, keep = spread_frames(kept, 5)  # given at 0, 5, 10
    lin, zero = masked_frames(full, keep, "linear"), masked_frames(full, keep)
    for j, a in [(1, 0.2), (3, 0.6), (4, 0.8), (7, 0.4), (9, 0.8)]:
        lo, hi = kept[:, :, j // 5], kept[:, :, j // 5 + 1]
        torch.testing.assert_close(lin[:, :3, j], (1 - a) * lo + a * hi)
    assert torch.equal(lin[:, :3, keep], zero[:, :3, keep]) and torch.equal(lin[:, 3], zero[:, 3])
    assert torch.all(zero[:, :3, ~keep] == 0) and lin[:, :3, ~keep].abs().min() > 0  # the option changes x_cond
    video = torch.randn(2, 3, 6, 4, 4, generator=g)
    fut = blend_given(video, extrapolation_mask(6, 2, "future"))  # frames 2..5 copy frame 1
    assert torch.equal(fut[:, :, :2], video[:, :, :2]) and torch.equal(fut[:, :, 5], video[:, :, 1])
    anim = blend_given(video, animation_mask(6, 3))  # every frame a copy of frame 3
    assert torch.equal(anim, repeat(video[:, :, 3], "b c h w -> b c t h w", t=6))
    per_clip = torch.stack([extrapolation_mask(6, 2, "past"), animation_mask(6, 0)])
    both = blend_given(video, per_clip)
    assert torch.equal(both[0, :, 0], video[0, :, 4]) and torch.equal(both[1, :, 5], video[1, :, 0])
    with pytest.raises(ValueError, match="fill"):
        masked_frames(full, keep, "nearest")


def _decoder_checkpoint(tmp_path):
    torch.manual_seed(0)
    dec = MakeAVideoDecoder(stage="video", unet=UNET, clip=CLIP, num_frames=4, resolution=8)
    _randomise(dec.unet)  # zero-initialised layers would make the comparison trivial
    path = tmp_path / "dt.ckpt"
    torch.save({"state_dict": dec.state_dict(), "hyper_parameters": dict(dec.hparams)}, path)
    return dec, str(path)


def test_upF_at_init_equals_Dt_on_the_noisy_channels_and_kept_frames_pass_through(tmp_path):
    dec, path = _decoder_checkpoint(tmp_path)
    up = MaskedFrameInterpolation(unet=UNET, clip=CLIP, init_from=path, num_frames=4, resolution=8, frame_skips=[3],
                                  sample_steps=2, sample_skip=3)
    assert {k for k, _ in up.load_report.missing} and all("skip_embed" in k for k, _ in up.load_report.missing)
    w = up.unet.input_conv.spatial.weight
    assert w.shape[1] == 7 and torch.all(w[:, 3:] == 0)  # noisy RGB + masked RGB + mask; the 4 new columns zero
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 7, 8, 8, generator=g), torch.tensor([3, 700])
    cond, fps = torch.randn(2, 64, generator=g), torch.tensor([4.0, 20.0])
    x_cond = masked_frames(torch.randn(2, 3, 7, 8, 8, generator=g), interpolation_mask(3, 3))
    x_lin = masked_frames(x_cond[:, :3], interpolation_mask(3, 3), "linear")  # cond_fill 'linear' (not the paper's)
    with torch.no_grad():
        ref = dec.unet(x, t, cond=cond, fps=fps)
        out = up.unet(x, t, cond=cond, fps=fps, frame_skip=torch.tensor([3.0, 5.0]), x_cond=x_cond)
        out_lin = up.unet(x, t, cond=cond, fps=fps, frame_skip=torch.tensor([3.0, 5.0]), x_cond=x_lin)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_lin, ref, rtol=0, atol=1e-5)  # whatever fills the masked frames
    # interpolation: n frames -> (n-1)*skip+1, the given frames returned unchanged
    clip = torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1
    out = up.interpolate(clip, 3, y_e=cond, fps=torch.tensor([2.0, 2.0]), generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, 7, 8, 8)
    assert torch.equal(out[:, :, ::3], clip)
    assert not torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_upF_replace_given_feeds_the_given_frames_noised_along_one_trajectory():
    """replace_given: at every sampling step the U-Net's noisy input holds the given frames as
    sqrt(a_t) x + sqrt(1 - a_t) eps with ONE eps for the run (t the original-schedule timestep it receives), under
    CFG too; the masked frames keep the sampler's own x_t; off, the given frames are the sampler's own."""
    torch.manual_seed(0)
    up = MaskedFrameInterpolation(unet=UNET, clip=CLIP, num_frames=7, resolution=8, frame_skips=[3], sample_steps=4,
                                  cond_drop_prob=0.1, cfg_scale=2.0, replace_given=True)
    _randomise(up.unet, 0.1)
    seen = []
    up.unet.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0].clone(), a[1].clone())), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1
    y_e = torch.randn(2, 64, generator=g)
    out = up.interpolate(clip, 3, y_e=y_e, fps=torch.tensor([2.0, 2.0]), generator=torch.Generator().manual_seed(1))
    assert len(seen) == 4 and all(x.shape[0] == 4 for x, _ in seen)  # 4 steps, CFG doubles the batch
    full, keep = spread_frames(clip, 3)
    abar = torch.cumprod(1 - torch.as_tensor(up.diffusion.base_betas, dtype=torch.float64), 0)  # 1 - a_t needs fp64
    eps = []
    for x, t in seen:
        a = abar[t].view(-1, 1, 1, 1, 1)
        e = ((x[:, :, keep].double() - a.sqrt() * torch.cat([clip, clip]).double()) / (1 - a).sqrt()).float()
        torch.testing.assert_close(e[:2], e[2:])  # the conditional and unconditional halves see the same input
        eps.append(e)
    for e in eps[1:]:
        torch.testing.assert_close(e, eps[0], rtol=0, atol=1e-4)  # one eps: the given frames' DDIM trajectory
    assert 0.7 < float(eps[0].std()) < 1.3
    assert torch.equal(out[:, :, keep], clip)  # and the given frames come back unchanged
    x, t = seen[0]  # the same numbers as the diffusion core's own forward process q(x_t | x_0) at t
    torch.testing.assert_close(x[:2, :, keep], up.diffusion.respaced("").q_sample(clip, t[:2], eps[0][:2]),
                               rtol=0, atol=1e-5)
    # off: the given frames of the model's input are the sampler's own x_t (the last step's is no noised clip)
    up.hparams.replace_given = False
    seen.clear()
    up.interpolate(clip, 3, y_e=y_e, fps=torch.tensor([2.0, 2.0]), generator=torch.Generator().manual_seed(1))
    x, t = seen[-1]
    a = abar[t].view(-1, 1, 1, 1, 1)
    e = ((x[:2, :, keep].double() - a[:2].sqrt() * clip.double()) / (1 - a[:2]).sqrt()).float()
    assert (e - eps[0][:2]).abs().max() > 1e-2
    with pytest.raises(MakeAVideoConfigError, match="replace_given"):
        MaskedFrameInterpolation.validate_config({"clip": CLIP, "num_frames": 7, "resolution": 8, "unet": UNET,
                                                  "frame_skips": [3], "replace_given": True,
                                                  "diffusion": {"process": "flow"}})


def test_upF_t_power_draws_floor_T_u_to_the_p_and_training_uses_it():
    up = MaskedFrameInterpolation(unet=UNET, clip=CLIP, num_frames=7, resolution=8, frame_skips=[3],
                                  masks={"interpolation": 1.0}, t_power=0.5)
    T = up.diffusion.num_timesteps
    t = up.training_timesteps(20000, torch.Generator().manual_seed(0)).double()
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    # t = floor(T sqrt(u)): P(t < T/2) = 1/4, E[t] = 2T/3 - 1/2
    assert abs(float((t < T / 2).double().mean()) - 0.25) < 0.015
    assert abs(float(t.mean()) - (2 * T / 3 - 0.5)) < 8
    u = torch.rand(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(up.training_timesteps(5, torch.Generator().manual_seed(3)),
                               (T * u.double() ** 0.5).long())
    assert MaskedFrameInterpolation(unet=UNET, clip=CLIP, num_frames=7, resolution=8,
                                    frame_skips=[3]).training_timesteps(4) is None  # 1: the uniform draw
    seen = {}
    orig = up.diffusion.training_losses
    up.diffusion.training_losses = lambda *a, **kw: seen.update(kw) or orig(*a, **kw)
    up.training_step({"video": torch.rand(2, 3, 7, 8, 8) * 2 - 1, "image_embed": torch.randn(2, 64),
                      "fps": torch.full((2,), 8.0)}, 0)
    assert seen["t"].shape == (2,) and seen["mask"] is not None
    with pytest.raises(MakeAVideoConfigError, match="t_power"):
        MaskedFrameInterpolation.validate_config({"clip": CLIP, "num_frames": 7, "resolution": 8, "unet": UNET,
                                                  "frame_skips": [3], "t_power": 1.5})


def test_upF_training_batches_draw_masks_and_skips():
    up = MaskedFrameInterpolation(unet=UNET, clip=CLIP, num_frames=11, resolution=8, frame_skips=[2, 5],
                                  masks={"interpolation": 1.0})
    seen = set()
    for s in range(12):
        x0, kw = up.model_inputs({"video": torch.randn(2, 3, 11, 8, 8), "fps": torch.tensor([8.0, 8.0])}, True,
                                 generator=torch.Generator().manual_seed(s))
        skip = int(kw["frame_skip"][0])
        seen.add(skip)
        assert x0.shape[2] == interpolated_length((11 - 1) // skip + 1, skip)  # 11 frames at skip 2 and 5
        given = kw["x_cond"][:, 3, :, 0, 0] == 0
        assert torch.equal(given[0], interpolation_mask((11 - 1) // skip + 1, skip))
        assert torch.equal(kw["loss_mask"].flatten(), ~given[0])  # the loss covers the masked frames
    assert seen == {2, 5}
    # cond_fill 'linear' reaches training and sampling: the masked frames of x_cond hold the blend, not zeros
    up.hparams.cond_fill = "linear"
    video = torch.randn(2, 3, 11, 8, 8)
    x0, kw = up.model_inputs({"video": video, "fps": torch.tensor([8.0, 8.0])}, True,
                             generator=torch.Generator().manual_seed(0))
    keep = kw["x_cond"][0, 3, :, 0, 0] == 0
    torch.testing.assert_close(kw["x_cond"], masked_frames(x0, keep, "linear"))
    seen_cond = []
    up.unet.register_forward_pre_hook(lambda m, a, kw: seen_cond.append(kw["x_cond"].clone()), with_kwargs=True)
    up.interpolate(video[:, :, :3], 2, y_e=torch.randn(2, 64), fps=torch.tensor([2.0, 2.0]), steps=2)
    full, keep = spread_frames(video[:, :, :3], 2)
    torch.testing.assert_close(seen_cond[0], masked_frames(full, keep, "linear"))
    with pytest.raises(MakeAVideoConfigError, match="cond_fill"):
        MaskedFrameInterpolation.validate_config({"clip": CLIP, "num_frames": 8, "resolution": 8, "unet": UNET,
                                                  "frame_skips": [2], "cond_fill": "noise"})
    with pytest.raises(MakeAVideoConfigError, match="frame_skips"):
        MaskedFrameInterpolation.validate_config({"clip": CLIP, "num_frames": 4, "resolution": 8, "frame_skips": [5],
                                                  "unet": UNET})
    with pytest.raises(MakeAVideoConfigError, match="masks"):
        MaskedFrameInterpolation.validate_config({"clip": CLIP, "num_frames": 8, "resolution": 8, "unet": UNET,
                                                  "masks": {"inpainting": 1.0}})


def test_upF_target_residual_diffuses_the_clip_minus_the_blend_and_adds_the_blend_back():
    """target 'residual' (not in the paper): training diffuses x0 - blend_given(x0) (zero on the given frames, the
    conditioning unchanged); sampling adds the blend back, so a net whose x0 estimate is zero returns exactly the
    linear blend of the given frames (with replace_given too); target 'clip' (the paper) returns zeros there."""
    torch.manual_seed(0)
    kw_up = dict(unet=UNET, clip=CLIP, num_frames=7, resolution=8, frame_skips=[3], masks={"interpolation": 1.0},
                 cond_fill="linear", sample_steps=3, diffusion={"predict": "x0"})
    res = MaskedFrameInterpolation(target="residual", **kw_up)
    clip_up = MaskedFrameInterpolation(**kw_up)
    video = torch.rand(2, 3, 7, 8, 8) * 2 - 1
    batch = {"video": video, "image_embed": torch.randn(2, 64), "fps": torch.full((2,), 8.0)}
    x0_r, kw_r = res.model_inputs(batch, True, generator=torch.Generator().manual_seed(0))
    x0_c, kw_c = clip_up.model_inputs(batch, True, generator=torch.Generator().manual_seed(0))
    keep = interpolation_mask(3, 3)
    torch.testing.assert_close(x0_r, x0_c - blend_given(x0_c, keep))
    assert float(x0_r[:, :, keep].abs().max()) == 0 and float(x0_r[:, :, ~keep].abs().max()) > 0.1
    torch.testing.assert_close(kw_r["x_cond"], kw_c["x_cond"])  # the conditioning is the same clip's
    for m in (res, clip_up):
        with torch.no_grad():
            for p in m.unet.parameters():
                p.zero_()  # x0 estimate 0 at every step
    given = video[:, :, ::3]
    full, keep = spread_frames(given, 3)
    for replace in (False, True):
        res.hparams.replace_given = replace
        out = res.interpolate(given, 3, y_e=torch.randn(2, 64), fps=torch.tensor([2.0, 2.0]),
                              generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, blend_given(full, keep), rtol=0, atol=1e-6)
    out = clip_up.interpolate(given, 3, y_e=torch.randn(2, 64), fps=torch.tensor([2.0, 2.0]),
                              generator=torch.Generator().manual_seed(1))
    assert float(out[:, :, ~keep].abs().max()) < 1e-6 and torch.equal(out[:, :, keep], given)
    with pytest.raises(MakeAVideoConfigError, match="target"):
        MaskedFrameInterpolation.validate_config({"clip": CLIP, "num_frames": 7, "resolution": 8, "unet": UNET,
                                                  "frame_skips": [3], "target": "flow"})


def test_tiny_upF_overfits():
    torch.manual_seed(0)
    up = MaskedFrameInterpolation(unet=UNET, clip=CLIP, num_frames=7, resolution=8, frame_skips=[3],
                                  masks={"interpolation": 1.0}, cond_drop_prob=0.0)
    g = torch.Generator().manual_seed(0)
    video = repeat(torch.rand(2, 3, 7, 8, 8, generator=g) * 2 - 1, "b ... -> (r b) ...", r=3)
    x0, kw = up.model_inputs({"video": video, "image_embed": torch.randn(6, 64, generator=g),
                              "fps": torch.full((6,), 8.0)}, train=False, generator=g)
    mask = kw.pop("loss_mask")
    t, noise = torch.tensor([100, 150, 400, 450, 800, 850]), torch.randn(x0.shape, generator=g)
    first, last = _overfit(lambda: up.diffusion.training_losses(up.unet, x0, kw, t=t, noise=noise,
                                                                mask=mask)["loss"].mean(),
                           up.unet.parameters(), 40, 5e-3)
    assert last * 5 <= first, (first, last)


# ------------------------------------------------------------------------------------------------------------ SR
SR_UNET = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), num_head_channels=8,
               groups=4)


def _sr(**kw):
    from vidgen.lightning_modules.make_a_video_sr import MakeAVideoSR

    args = dict(stage="spatial", phase="image", unet=SR_UNET, scale_factor=2, resolution=8, num_frames=3,
                sample_steps=3)
    return MakeAVideoSR(**{**args, **kw})


def test_sr_conditioning_is_the_upsampled_input_and_the_aug_level_reaches_the_embedding():
    from vidgen.lightning_modules.make_a_video_sr import downsample, upsample_bilinear

    torch.manual_seed(0)
    sr = _sr(stage="spatiotemporal", phase="video", sample_aug_level=0.0)
    _randomise(sr.unet, 0.1)
    seen = {}
    sr.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    sr.unet.aug_embed.register_forward_hook(lambda m, a, out: seen.update(aug_in=a[0], aug_out=out))
    low = torch.rand(2, 3, 3, 4, 4) * 2 - 1
    sr.upsample(low, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["x_cond"], upsample_bilinear(low, (8, 8)))  # level 0: exactly the upsampled LR
    assert torch.all(seen["aug_in"] == 0)
    sr.upsample(low, torch.Generator().manual_seed(0), aug_level=0.5)
    assert torch.all(seen["aug_in"] == round(0.5 * 999))  # the chosen level is what the embedding receives
    # the embedding output enters the network: two levels, same noise, different outputs
    a = sr.upsample(low, torch.Generator().manual_seed(0), aug_level=0.0)
    b = sr.unet(torch.zeros(2, 3, 3, 8, 8), torch.tensor([5, 5]), x_cond=upsample_bilinear(low, (8, 8)),
                aug_level=torch.tensor([0.0, 0.0]))
    c = sr.unet(torch.zeros(2, 3, 3, 8, 8), torch.tensor([5, 5]), x_cond=upsample_bilinear(low, (8, 8)),
                aug_level=torch.tensor([400.0, 400.0]))
    assert a.shape == (2, 3, 3, 8, 8) and (b - c).abs().max() > 1e-4
    # training: the LR input is the antialiased downsampled target, noised to a drawn level (level 0 -> clean)
    x0, kw = sr.model_inputs({"video": torch.rand(4, 3, 3, 8, 8) * 2 - 1}, train=True,
                             generator=torch.Generator().manual_seed(3))
    assert x0.shape == (4, 3, 3, 8, 8) and kw["x_cond"].shape == x0.shape and kw["aug_level"].max() <= 500
    clean = sr.condition(downsample(x0, 2), (8, 8), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(clean, upsample_bilinear(downsample(x0, 2), (8, 8)))


def test_sr_h_shares_the_initial_noise_across_frames_not_clips_and_frame_batching_is_exact():
    torch.manual_seed(0)
    sr = _sr(sample_aug_level=0.2)
    _randomise(sr.unet, 0.1)
    assert not any("temporal" in n for n, _ in sr.unet.named_parameters())  # SR_h: no temporal layers
    frame = torch.rand(1, 3, 1, 4, 4) * 2 - 1
    low = repeat(frame, "1 c 1 h w -> b c t h w", b=2, t=3)  # 2 clips of 3 identical frames
    out = sr.upsample(low, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 3, 8, 8)
    for i in range(1, 3):
        torch.testing.assert_close(out[:, :, i], out[:, :, 0], rtol=0, atol=1e-6)  # same LR frame -> same output
    assert (out[0] - out[1]).abs().max() > 1e-3  # a different noise per clip
    batched = sr.upsample(low, torch.Generator().manual_seed(0), frame_batch=2)
    torch.testing.assert_close(batched, out, rtol=0, atol=1e-5)  # frame batches bound memory, same result
    per_frame = _sr(sample_aug_level=0.2, shared_noise=False)
    per_frame.load_state_dict(sr.state_dict())
    pf = per_frame.upsample(low, torch.Generator().manual_seed(0))
    assert (pf[:, :, 1] - pf[:, :, 0]).abs().max() > 1e-3  # the ablation: per-frame noise breaks the consistency


@pytest.mark.parametrize("stage,phase", [("spatial", "image"), ("spatiotemporal", "video")])
def test_sr_sample_start_begins_at_the_noised_upsampled_input(stage, phase):
    """sample_start 1/k: the first U-Net call is at t0 = the top of the first 1/k of the schedule, on
    sqrt(a_t0) up(low) + sqrt(1 - a_t0) eps, and the sample_steps steps all lie below t0; SR_h keeps one noise per clip."""
    from vidgen.lightning_modules.make_a_video_sr import upsample_bilinear

    torch.manual_seed(0)
    sr = _sr(stage=stage, phase=phase, sample_start=0.5, sample_aug_level=0.0, sample_steps=3)
    _randomise(sr.unet, 0.1)
    calls = []
    sr.unet.register_forward_pre_hook(lambda m, a, kw: calls.append((a[0].clone(), a[1].clone())), with_kwargs=True)
    frame = torch.rand(1, 3, 1, 4, 4) * 2 - 1
    low = torch.cat([repeat(frame, "1 c 1 h w -> 1 c t h w", t=3), torch.rand(1, 3, 3, 4, 4) * 2 - 1])
    out = sr.upsample(low, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 3, 8, 8) and len(calls) == 3
    x, t = calls[0]
    assert torch.all(t == 499) and all(int(tt.max()) < 499 for _, tt in calls[1:])  # 1000 steps, k = 2
    abar = torch.cumprod(1 - torch.as_tensor(sr.diffusion.base_betas), 0).float()[499]
    up = upsample_bilinear(low, (8, 8))
    up = rearrange(up, "b c t h w -> (b t) c h w") if stage == "spatial" else up
    eps = (x - abar.sqrt() * up) / (1 - abar).sqrt()
    assert abs(float(eps.mean())) < 0.15 and 0.8 < float(eps.std()) < 1.2
    if stage == "spatial":  # identical LR frames: identical start and output (one noise per clip)
        torch.testing.assert_close(eps[1], eps[0]) and torch.testing.assert_close(out[0, :, 1], out[0, :, 0])
    assert sr.start(3, up)[0] == "3,0"
    with pytest.raises(MakeAVideoConfigError, match="sample_start"):
        _sr(sample_start=0.4)


def test_sr_l_temporal_chunking_and_images_then_video(tmp_path):
    from vidgen.lightning_modules.make_a_video_sr import chunked_over_time, temporal_windows

    assert temporal_windows(76, 16, 4) == [(s, s + 16) for s in (0, 12, 24, 36, 48, 60)]
    assert temporal_windows(10, 16, 4) == [(0, 10)]
    wins = temporal_windows(13, 5, 2)
    assert wins[0][0] == 0 and wins[-1][1] == 13 and all(b[0] < a[1] for a, b in zip(wins, wins[1:]))
    # images first: the image phase has no temporal layers; the video phase loads it and starts at identity
    torch.manual_seed(0)
    img = _sr(stage="spatiotemporal", phase="image", sample_aug_level=0.0)
    _randomise(img.unet, 0.1)
    path = tmp_path / "sr_image.ckpt"
    torch.save({"state_dict": img.state_dict()}, path)
    vid = _sr(stage="spatiotemporal", phase="video", init_from=str(path), sample_aug_level=0.0, chunk_frames=4,
              chunk_overlap=2)
    assert vid.load_report.missing and all("temporal" in k for k, _ in vid.load_report.missing)
    low = torch.rand(1, 3, 9, 4, 4) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    full = img.upsample(low, g())  # frames independently
    torch.testing.assert_close(vid.upsample(low, g()), full, rtol=0, atol=1e-5)  # identity temporal layers, chunked
    # with trained (random) temporal layers the windows' outputs are averaged where they overlap
    _randomise(vid.unet, 0.1, seed=5)
    x, t = torch.randn(1, 3, 9, 8, 8), torch.tensor([10])
    kw = {"x_cond": torch.randn(1, 3, 9, 8, 8), "aug_level": torch.tensor([0.0])}
    with torch.no_grad():
        chunked = chunked_over_time(vid.unet, 4, 2)(x, t, **kw)
        first = vid.unet(x[:, :, :4], t, x_cond=kw["x_cond"][:, :, :4], aug_level=kw["aug_level"])
        whole = chunked_over_time(vid.unet, 9, 2)(x, t, **kw)
    torch.testing.assert_close(chunked[:, :, :2], first[:, :, :2])  # frames in one window only: that window's output
    torch.testing.assert_close(whole, vid.unet(x, t, **kw))
    with pytest.raises(MakeAVideoConfigError, match="SR_h has no temporal"):
        _sr(stage="spatial", phase="video")


@pytest.mark.parametrize("stage,phase", [("spatial", "image"), ("spatiotemporal", "video")])
def test_tiny_sr_overfits(stage, phase):
    torch.manual_seed(0)
    sr = _sr(stage=stage, phase=phase)
    g = torch.Generator().manual_seed(0)
    video = repeat(torch.rand(2, 3, 3, 8, 8, generator=g) * 2 - 1, "b ... -> (r b) ...", r=3)
    x0, kw = sr.model_inputs({"video": video}, train=True, generator=g)
    t, noise = torch.randint(50, 900, (x0.shape[0],), generator=g), torch.randn(x0.shape, generator=g)
    first, last = _overfit(lambda: sr.diffusion.training_losses(sr.unet, x0, kw, t=t, noise=noise)["loss"].mean(),
                           sr.unet.parameters(), 40, 1e-2)
    assert last * 5 <= first, (first, last)


# ------------------------------------------------------------------------------------------------------- cascade
def _save(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


def _tiny_cascade(tmp_path, **kw):
    from vidgen.lightning_modules.make_a_video import DiffusionPrior, _defaults
    from vidgen.lightning_modules.make_a_video_cascade import MakeAVideoCascade

    torch.manual_seed(0)
    prior = _save(DiffusionPrior(clip=CLIP, dim=16, depth=1, heads=2, max_text_len=8), tmp_path / "prior.ckpt")
    dec = MakeAVideoDecoder(stage="video", unet=UNET, clip=CLIP, num_frames=3, resolution=8, prior=prior)
    _randomise(dec.unet, 0.05)
    dec_path = _save(dec, tmp_path / "dt.ckpt")
    up = MaskedFrameInterpolation(unet=UNET, clip=CLIP, init_from=dec_path, num_frames=5, resolution=8,
                                  frame_skips=[2])
    srl = _sr(stage="spatiotemporal", phase="video", resolution=16)
    srh = _sr(stage="spatial", phase="image", resolution=32)
    for m in (srl, srh):
        _randomise(m.unet, 0.05)
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    # built as LightningCLI builds it: inside Lightning's context that hands the CLI's hyper-parameters to
    # save_hyperparameters(); the stages loaded inside must still record their own
    args = dict(decoder=dec_path, interpolation=_save(up, tmp_path / "upF.ckpt"), sr_low=_save(srl, tmp_path / "srl.ckpt"),
                sr_high=_save(srh, tmp_path / "srh.ckpt"), frame_skip=2,
                steps={"prior": 2, "decoder": 2, "interpolation": 2, "sr_low": 2, "sr_high": 2},
                guidance={"prior": 1.0, "decoder": 2.0, "interpolation": 1.0}, **kw)
    given = {**_defaults(MakeAVideoCascade), **args}  # what the CLI hands over: the full config of the outer module
    with _given_hyperparameters_context(hparams=given, instantiator="test"):
        return MakeAVideoCascade(**args)


def test_cascade_end_to_end_shapes_and_seeding(tmp_path):
    cascade = _tiny_cascade(tmp_path, frame_batch=4)
    texts = ["a red square moving left", "a blue circle moving up"]
    out = cascade.run(texts, generator=torch.Generator().manual_seed(0), keep_stages=True)
    shapes = {k: tuple(v.shape) for k, v in out["stages"].items()}
    assert shapes == {"decoder": (2, 3, 3, 8, 8), "interpolation": (2, 3, 5, 8, 8),  # 3 frames -> (3-1)*2+1
                      "sr_low": (2, 3, 5, 16, 16), "sr_high": (2, 3, 5, 32, 32)}
    assert torch.equal(out["stages"]["interpolation"][:, :, ::2], out["stages"]["decoder"])  # kept frames pass
    assert out["video"].abs().max() <= 1
    again = cascade.run(texts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["video"], out["video"])  # seeded runs are identical
    other = cascade.run(texts, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other["video"], out["video"])
    fps_seen = []  # ↑F is conditioned on sample_fps x frame_skip, or on interpolation_fps when set
    cascade.interpolation.unet.register_forward_pre_hook(lambda m, a, kw: fps_seen.append(kw["fps"].clone()),
                                                         with_kwargs=True)
    cascade.run(texts, generator=torch.Generator().manual_seed(0))
    assert torch.all(fps_seen[-1] == cascade.hparams.sample_fps * 2)
    cascade.hparams.interpolation_fps = 8.0
    cascade.run(texts, generator=torch.Generator().manual_seed(0))
    assert torch.all(fps_seen[-1] == 8.0)
    cascade.hparams.interpolation_fps = None
    pred = cascade.predict_step({"text": texts, "key": ["a", "b"]}, 0)
    assert pred["videos"].shape == (2, 3, 5, 32, 32) and pred["captions"] == texts
    assert cascade.prediction_inputs() == {"kind": "text"}


def test_cascade_config_errors_and_ucf101_prompts(tmp_path):
    from vidgen.lightning_modules.make_a_video_cascade import MakeAVideoCascade, ucf101_prompts

    with pytest.raises(MakeAVideoConfigError, match="decoder"):
        MakeAVideoCascade.validate_config({"decoder": str(tmp_path / "missing.ckpt")})
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"")
    with pytest.raises(MakeAVideoConfigError, match="only .*prior"):
        MakeAVideoCascade.validate_config({"decoder": str(path), "guidance": {"sr_high": 2.0}})
    with pytest.raises(MakeAVideoConfigError, match="unknown stages"):
        MakeAVideoCascade.validate_config({"decoder": str(path), "steps": {"upsampler": 3}})
    assert ucf101_prompts(["ApplyEyeMakeup", "YoYo", "PlayingPiano"]) == [
        "a person apply eye makeup.", "a person yo yo.", "a person playing piano."]
