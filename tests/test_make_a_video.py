"""Make-A-Video part 1 (spec make_a_video_videopoet.md §1.2-§1.5): the pseudo-3D U-Net's identity init and
factorisation (Eq. 2, Eq. 3), the prior's causality and x0 loss, fps sampling and its curriculum, and tiny overfits."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from einops import rearrange, repeat
from scipy import stats

from vidgen.callbacks.curriculum import StagedCurriculum
from vidgen.datamodules.decode import ClipSpec, target_fps
from vidgen.datamodules.video import DataConfigError, VideoDataModule
from vidgen.lightning_modules.make_a_video import DiffusionPriorNetwork, MakeAVideoConfigError, MakeAVideoDecoder, PriorConfig
from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion
from vidgen.lightning_modules.nn.unet import (NEW_VIDEO_PATTERNS, PseudoConv3d, SpatialAttention, TemporalAttention,
                                              TemporalConv1d, UNet, UNetConfig)
from vidgen.lightning_modules.stream_probe import StreamProbe
from shardgen import write_shards

TINY = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_head_channels=8,
            groups=4, cond_dim=8, num_cond_tokens=2)


def _randomise(module, skip=()):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(s in name for s in skip):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def _image_and_video_unets(dtype=torch.float64):
    torch.manual_seed(0)
    image = UNet(UNetConfig(**TINY)).to(dtype)
    _randomise(image)  # zero-initialised output layers would make the comparison trivial
    video = UNet(UNetConfig(**TINY, temporal=True, fps_cond=True)).to(dtype)
    report = video.load_image_weights(image.state_dict())
    assert report.missing and all(UNet.is_new_video_parameter(k) for k, _ in report.missing)
    return image, video


# ---------------------------------------------------------------------------------------------------------- U-Net
def test_identity_init_video_unet_equals_image_unet_per_frame():
    image, video = _image_and_video_unets()
    b, f = 2, 5
    x = torch.randn(2, 3, f, 8, 8, dtype=torch.float64)
    t, c = torch.tensor([7, 600]), torch.randn(2, 8, dtype=torch.float64)
    out = video(x, t, cond=c, fps=torch.tensor([3.0, 24.0]))
    ref = image(rearrange(x, "b c f h w -> (b f) c h w"), repeat(t, "b -> (b f)", f=f),
                cond=repeat(c, "b d -> (b f) d", f=f))
    ref = rearrange(ref, "(b f) c h w -> b c f h w", b=b)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)  # float rounding only (GEMM blocking by batch size)
    # the image net is the video net with the temporal layers off: an image batch gives the same output
    torch.testing.assert_close(video(x[:, :, 0], t, cond=c), image(x[:, :, 0], t, cond=c), rtol=0, atol=1e-12)


def test_temporal_inits_are_identity():
    conv = TemporalConv1d(6, 3)
    x = torch.randn(4 * 3, 6, 5, 5)
    assert torch.equal(conv(x, 4), x)  # Dirac weights, zero bias: exact
    attn = TemporalAttention(8, 4)
    y = torch.randn(3 * 4, 8, 2, 2)
    assert torch.equal(attn(y, 4), y)  # zero output projection


def _frame_mixing(fn, x, frames, frame=2):
    y0 = fn(x)
    x2 = rearrange(x.clone(), "(b f) c h w -> b f c h w", f=frames)
    x2[:, frame] += torch.randn_like(x2[:, frame])
    y1 = rearrange(fn(rearrange(x2, "b f c h w -> (b f) c h w")), "(b f) c h w -> b f c h w", f=frames)
    y0 = rearrange(y0, "(b f) c h w -> b f c h w", f=frames)
    return (y1 - y0).abs().amax(dim=(0, 2, 3, 4))  # change per frame


def _video_fn(net, f, fps=True):
    """A U-Net on 2 clips as a function of their ``(b f) c h w`` frames (time step, y_e and fps fixed per clip)."""
    kw = dict(cond=torch.ones(2, 8), fps=torch.tensor([4.0, 12.0]) if fps else None)
    return lambda h: rearrange(net(rearrange(h, "(b f) c h w -> b c f h w", f=f), torch.tensor([5, 9]), **kw),
                               "b c f h w -> (b f) c h w")


def _randomise_temporal_convs(net):
    """Give every ``Conv_1D`` of Eq. 2 non-identity weights (the control: a temporal layer that does mix frames)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, TemporalConv1d):
                m.weight.add_(torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype) * 0.3)


def test_spatial_layers_never_mix_frames():
    """Eq. 2 / Eq. 3 with the temporal layers at their identity init: changing one frame changes only that frame's
    output, in ``PseudoConv3d.forward`` (Conv_2D then the Dirac Conv_1D), in ATTN_2D, in the image U-Net applied to
    frames and in the full video U-Net D^t (spatial weights randomised, temporal layers and fps embedding as
    initialised). Controls: the same check on the same inputs reports mixing once the temporal convs leave identity."""
    torch.manual_seed(0)
    f = 4
    conv = PseudoConv3d(8, 8, temporal=True)
    _randomise(conv, skip=("temporal",))
    attn = SpatialAttention(8, 4, 4, context_dim=8)
    _randomise(attn)
    image_net = UNet(UNetConfig(**TINY))
    _randomise(image_net)
    video_net = UNet(UNetConfig(**TINY, temporal=True, fps_cond=True))
    _randomise(video_net, skip=NEW_VIDEO_PATTERNS)  # the pretrained D's weights; what D^t adds stays at its init
    assert any(isinstance(m, TemporalConv1d) for m in video_net.modules())
    x = torch.randn(2 * f, 8, 6, 6)
    ctx = torch.randn(2, 3, 8)
    frames = rearrange(torch.randn(2, 3, f, 8, 8), "b c f h w -> (b f) c h w")
    cases = [
        ("Conv_P3D (PseudoConv3d.forward)", lambda h: conv(h, f), x),
        ("ATTN_2D", lambda h: attn(h, f, ctx), x),
        ("image U-Net on frames", _video_fn(image_net, f, fps=False), frames),
        ("video U-Net D^t, temporal layers at init", _video_fn(video_net, f), frames),
    ]
    for name, fn, inp in cases:
        change = _frame_mixing(fn, inp, f)
        assert change[2] > 1e-3, name
        assert torch.all(change[[0, 1, 3]] == 0), f"{name} mixes frames: {change}"

    # controls: the check sees mixing when a temporal conv is not the identity (Conv_1D, kernel 3: frames 1 and 3
    # are neighbours of frame 2; through the U-Net's stacked convs every frame is reached)
    _randomise_temporal_convs(conv)
    change = _frame_mixing(lambda h: conv(h, f), x, f)
    assert change[1] > 1e-3 and change[3] > 1e-3 and change[0] == 0, change
    _randomise_temporal_convs(video_net)
    change = _frame_mixing(_video_fn(video_net, f), frames, f)
    assert torch.all(change[[0, 1, 3]] > 1e-3), change


def test_temporal_layers_never_mix_positions():
    torch.manual_seed(0)
    f = 5
    conv = TemporalConv1d(6, 3)
    attn = TemporalAttention(8, 4)
    _randomise(conv)
    _randomise(attn)
    for name, layer, c in [("Conv_1D", conv, 6), ("ATTN_1D", attn, 8)]:
        x = torch.randn(2 * f, c, 4, 4)
        y0 = layer(x, f)
        x2 = x.clone()
        x2[:, :, 1, 2] += torch.randn(2 * f, c)
        diff = (layer(x2, f) - y0).abs().amax(dim=(0, 1))  # change per spatial position [H, W]
        assert diff[1, 2] > 1e-3, name
        diff[1, 2] = 0
        assert torch.all(diff == 0), f"{name} mixes spatial positions"


def test_image_batch_never_touches_temporal_parameters():
    _, video = _image_and_video_unets(torch.float32)
    x = torch.randn(2, 3, 8, 8)
    for inp in (x, x[:, :, None]):  # [B, C, H, W] and T = 1
        video.zero_grad(set_to_none=True)
        video(inp, torch.tensor([3, 50]), cond=torch.randn(2, 8)).square().mean().backward()
        new = dict(video.new_video_parameters())
        assert new and any("temporal" in n for n in new)
        for name, p in new.items():
            assert p.grad is None or torch.all(p.grad == 0), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in video.named_parameters() if n not in new)


def test_zero_init_conditioning_channels_and_configs():
    torch.manual_seed(0)
    base = UNet(UNetConfig(**TINY, temporal=True))
    _randomise(base)
    interp = UNet(UNetConfig(**TINY, temporal=True, cond_in_channels=4))  # ↑F: masked RGB + mask
    sd = base.state_dict()
    w = interp.input_conv.spatial.weight
    assert torch.all(w[:, 3:] == 0)
    sd["input_conv.spatial.weight"] = torch.cat([sd["input_conv.spatial.weight"], w[:, 3:]], dim=1)
    interp.load_state_dict(sd)
    x, t, c = torch.randn(1, 3, 3, 8, 8), torch.tensor([10]), torch.randn(1, 8)
    torch.testing.assert_close(interp(x, t, cond=c, x_cond=torch.randn(1, 4, 3, 8, 8)), base(x, t, cond=c))
    sr = UNet(UNetConfig(**TINY, cond_in_channels=3, noise_aug_cond=True))
    assert sr(torch.randn(1, 3, 8, 8), t, cond=c, x_cond=torch.randn(1, 3, 8, 8), aug_level=t).shape == (1, 3, 8, 8)


def test_decoder_config_errors():
    with pytest.raises(MakeAVideoConfigError, match="clip.checkpoint"):
        MakeAVideoDecoder.validate_config({"stage": "video", "clip": {}})
    with pytest.raises(MakeAVideoConfigError, match="stage"):
        MakeAVideoDecoder.validate_config({"stage": "audio"})
    with pytest.raises(MakeAVideoConfigError, match="spatial_lr_scale"):
        MakeAVideoDecoder.validate_config({"stage": "image", "spatial_lr_scale": 0.1})


# ---------------------------------------------------------------------------------------------------------- prior
def _prior_net():
    torch.manual_seed(0)
    return DiffusionPriorNetwork(PriorConfig(embed_dim=8, text_dim=12, dim=16, depth=2, heads=2, max_text_len=5))


def test_prior_attention_is_causal_over_its_sequence():
    net = _prior_net().eval()
    assert all(blk.attn.causal for blk in net.blocks)
    b = 2
    seq = net.sequence(torch.randn(b, 8), torch.tensor([3, 900]), torch.randn(b, 8), torch.randn(b, 5, 12),
                       torch.ones(b, 5, dtype=torch.bool))
    assert seq.shape == (b, 5 + 4, 16)  # [x̂ (5), x_e, t, noised y_e, query]
    with torch.no_grad():
        out0 = net.transformer(seq)
        for k in range(seq.shape[1]):
            s2 = seq.clone()
            s2[:, k] += 1.0
            d = (net.transformer(s2) - out0).abs().amax(dim=(0, 2))
            assert torch.all(d[:k] == 0), f"position {k} leaks into earlier positions: {d}"
            assert torch.all(d[k:] > 0), f"position {k} must reach every later position: {d}"


def test_x0_prediction_loss_closed_form():
    T = 1000
    diff = create_diffusion(DiffusionConfig(schedule="cosine", steps=T, predict="x0", learn_sigma=False, loss="mse"))
    x0, noise = torch.randn(4, 8), torch.randn(4, 8)
    t = torch.tensor([0, 10, 300, 700])
    w = torch.randn(8)

    def model(x_t, t_in):
        return x_t * w  # any function of x_t

    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731 (Nichol & Dhariwal Eq. 17)
    abar = torch.tensor([f(int(s) + 1) / f(0) for s in t], dtype=torch.float64)[:, None]
    x_t = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    want = ((x0.double() - x_t * w.double()) ** 2).mean(dim=1)
    got = diff.training_losses(model, x0, t=t, noise=noise)["loss"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_prior_module_trains_x0_prediction_of_scaled_clip_embeddings():
    from vidgen.lightning_modules.clip import CLIP_SIZES
    from vidgen.lightning_modules.make_a_video import DiffusionPrior

    prior = DiffusionPrior(clip={"model_cfg": CLIP_SIZES["tiny"]}, dim=16, depth=1, heads=2, max_text_len=8)
    d = prior.diffusion
    assert d.predict == "x0" and not d.learn_sigma and d.num_timesteps == 1000
    y = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    x0, kw = prior.model_inputs({"image_embed": y, "text": ["a red square moving left"] * 3}, train=False)
    torch.testing.assert_close(x0, y * 8.0)  # DALLE2-pytorch image_embed_scale = sqrt(64)
    assert kw["text_tokens"].shape[:2] == kw["text_mask"].shape and not kw["cond_drop"].any()
    t, noise = torch.tensor([5, 250, 900]), torch.randn(3, 64)
    with torch.no_grad():
        got = d.training_losses(prior.denoiser, x0, kw, t=t, noise=noise)["loss"]
        want = ((x0 - prior.network(d.q_sample(x0, t, noise), t, **kw)) ** 2).mean(dim=1)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------- fps
def test_target_fps_follows_the_beta_distribution():
    spec = ClipSpec(fps_range=(1.0, 30.0), fps_beta=(2.0, 5.0))
    rng = np.random.default_rng(0)
    draws = np.array([target_fps(spec, rng) for _ in range(4000)])
    assert draws.min() >= 1.0 and draws.max() <= 30.0
    ks = stats.kstest((draws - 1.0) / 29.0, stats.beta(2.0, 5.0).cdf)
    assert ks.pvalue > 0.01, ks
    assert target_fps(spec, None) == pytest.approx(1 + 29 * 2 / 7)  # eval: the Beta mean
    assert [target_fps(spec, np.random.default_rng(5)) for _ in range(2)][0] == target_fps(spec, np.random.default_rng(5))


@pytest.fixture(scope="module")
def fps_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("fps")
    write_shards(str(root / "a"), n_shards=2, per_shard=6, frames=12, prefix="a", caption=False)
    return str(root / "a")


def test_datamodule_records_drawn_fps(fps_shards):
    def fps_seen(seed):
        dm = VideoDataModule(train_shards=fps_shards, seed=seed, num_frames=4, resolution=16, batch_size=3,
                             num_workers=0, fps_range=[1, 30], fps_beta=[2, 2])
        dm.setup("fit")
        return torch.cat([b["fps"] for b in dm.train_dataloader()])

    a = fps_seen(1)
    assert len(a) == 12 and a.min() >= 1 and a.max() <= 30 and a.std() > 1
    assert torch.equal(a, fps_seen(1)) and not torch.equal(a, fps_seen(2))
    with pytest.raises(DataConfigError, match="fps_range"):
        VideoDataModule(train_shards=fps_shards, seed=0, fps=8, fps_range=[1, 30])


class FpsProbe(StreamProbe):
    def __init__(self):
        super().__init__(channels=4, lr=0.01)
        self.fps = []

    def training_step(self, batch, batch_idx):
        self.fps.append((self.global_step, batch["fps"].tolist()))
        return super().training_step(batch, batch_idx)


FPS_STAGES = [{"name": "high_fps", "fps_range": [20, 30]}, {"name": "low_fps", "at_step": 3, "fps_range": [1, 4]}]


def _fps_fit(tmp_path, shards, steps, ckpt_in=None, ckpt_out=None):
    torch.manual_seed(0)
    model = FpsProbe()
    tr = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[StagedCurriculum(FPS_STAGES)],
                   default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    dm = VideoDataModule(train_shards=shards, seed=3, num_frames=4, resolution=16, batch_size=2, num_workers=0,
                         fps_range=[1, 30], fps_beta=[1, 1])
    tr.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out:
        tr.save_checkpoint(ckpt_out)
    return model.fps


def test_fps_curriculum_moves_the_range_at_the_step_and_resumes_exactly(fps_shards, tmp_path):
    full = _fps_fit(tmp_path, fps_shards, 6)
    for step, fps in full:
        lo, hi = (20, 30) if step < 3 else (1, 4)
        assert all(lo <= v <= hi for v in fps), (step, fps)
    ckpt = str(tmp_path / "k4.ckpt")
    _fps_fit(tmp_path, fps_shards, 4, ckpt_out=ckpt)
    resumed = _fps_fit(tmp_path, fps_shards, 6, ckpt_in=ckpt)
    assert resumed == full[4:]


# ---------------------------------------------------------------------------------------------------------- overfit
def _overfit(loss_fn, params, steps, lr):
    """Adam on a fixed loss (fixed examples, timesteps and noise); the loss before and after."""
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        first = float(loss_fn())
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        return first, float(loss_fn())


def test_tiny_video_decoder_and_prior_overfit():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # D^t: the video U-Net on 2 clips, each at 3 fixed timesteps and noises (eps-prediction MSE)
    net = UNet(UNetConfig(**TINY, temporal=True, fps_cond=True))
    diff = create_diffusion(DiffusionConfig(schedule="cosine", predict="eps", learn_sigma=False, loss="mse"))
    x0 = repeat(torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1, "b ... -> (r b) ...", r=3)
    kw = {"cond": repeat(torch.randn(2, 8, generator=g), "b d -> (r b) d", r=3),
          "fps": torch.tensor([4.0, 12.0]).repeat(3)}
    t, noise = torch.tensor([100, 150, 400, 450, 800, 850]), torch.randn(x0.shape, generator=g)
    first, last = _overfit(lambda: diff.training_losses(net, x0, kw, t=t, noise=noise)["loss"].mean(),
                           net.parameters(), 40, 5e-3)
    assert last * 5 <= first, (first, last)
    # P: the prior network, x0-prediction of 3 CLIP-like embeddings from their (random) text conditions
    prior = _prior_net()
    pd = create_diffusion(DiffusionConfig(schedule="cosine", predict="x0", learn_sigma=False, loss="mse"))
    y = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1) * 8**0.5
    pkw = {"text_embed": torch.randn(3, 8, generator=g), "text_tokens": torch.randn(3, 5, 12, generator=g),
           "text_mask": torch.ones(3, 5, dtype=torch.bool)}
    t, noise = torch.tensor([300, 500, 700]), torch.randn(y.shape, generator=g)
    first, last = _overfit(lambda: pd.training_losses(prior, y, pkw, t=t, noise=noise)["loss"].mean(),
                           prior.parameters(), 60, 5e-3)
    assert last * 5 <= first, (first, last)


def _clip_retrieval_worker(rank, world, init_file, out_dir):
    import json
    import os

    from vidgen.lightning_modules.clip import gather_pairs, retrieval_accuracy

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt, caps = _clip_retrieval_data()
        mine = gather_pairs(img[rank::world], txt[rank::world], caps[rank::world])
        with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
            json.dump([retrieval_accuracy(mine[1], mine[0], mine[2]), len(mine[2])], f)
    finally:
        torch.distributed.destroy_process_group()


def _clip_retrieval_data():
    g = torch.Generator().manual_seed(0)
    caps = [f"caption {i % 5}" for i in range(12)]
    txt = torch.randn(12, 8, generator=g)
    img = txt + 0.8 * torch.randn(12, 8, generator=g)  # some frames closer to another caption's text
    return img, txt, caps


@pytest.mark.distributed
def test_clip_val_retrieval_ranks_against_every_rank_frames(tmp_path):
    """Under DDP each rank validates a shard of the pairs; ``val/retrieval_acc`` ranks every caption against the
    frames of the whole split (``gather_pairs``), so 2 processes report what 1 process does, on both ranks."""
    import json

    from vidgen.lightning_modules.clip import gather_pairs, retrieval_accuracy

    img, txt, caps = _clip_retrieval_data()
    assert gather_pairs(img, txt, caps)[2] is caps  # one process: unchanged
    one = list(retrieval_accuracy(txt, img, caps))
    per_rank = [retrieval_accuracy(txt[r::2], img[r::2], caps[r::2]) for r in (0, 1)]
    assert any(list(p) != one for p in per_rank)  # what the per-rank metric reported before: not the split's value
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_clip_retrieval_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)),
                                          nprocs=2, start_method=method)
    for r in (0, 1):
        (acc, chance), n = json.load(open(tmp_path / f"r{r}.json"))
        assert n == 12 and acc == pytest.approx(one[0]) and chance == pytest.approx(one[1])
