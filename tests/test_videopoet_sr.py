"""VideoPoet super-resolution transformer (spec make_a_video_videopoet.md §2.8): windows, token factorisation,
the two-head loss, the two guidance scales, the LR condition and an overfit run."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vidgen.lightning_modules.nn.attention import CrossAttention, MultiHeadAttention, Windows
from vidgen.lightning_modules.videopoet_sr import (
    WINDOWS, SRConfigError, TokenFactorization, VideoPoetSR, VideoPoetSRConfig, bicubic_downsample, dual_guidance,
    factorized_loss, lr_window,
)

PAPER_GRIDS = {"stage1": (5, 56, 32), "stage2": (5, 112, 64)}
TINY_WINDOWS = {"vertical": [1, 8, 2], "horizontal": [1, 2, 8], "temporal": [4, 4, 4]}


def _coords(grid):
    return torch.tensor(list(itertools.product(*(range(n) for n in grid))))  # raster (t, h, w)


def _tiny(**kw) -> VideoPoetSR:
    args = dict(stage="custom", windows=TINY_WINDOWS, visual_codes=256, token_grid=[4, 8, 8], text_dim=8, width=32,
                heads=4, depth=1)
    args.update(kw)
    return VideoPoetSR(**args)


# ------------------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("axis", ["vertical", "horizontal", "temporal"])
@pytest.mark.parametrize("side", ["hr", "lr"])
def test_window_partition_covers_every_token_once_and_never_mixes_windows(stage, axis, side):
    grid = PAPER_GRIDS[stage]
    window = WINDOWS[stage][axis]
    if side == "lr":
        grid, window = (grid[0], grid[1] // 2, grid[2] // 2), lr_window(window)
    win = Windows(grid, window)
    n = math.prod(grid)
    ids = torch.arange(n)[None, :, None]
    parts = win.split(ids)                                        # [nW, window tokens, 1]
    assert parts.shape == (win.num_windows, math.prod(window), 1)
    assert torch.equal(parts.flatten().sort().values, torch.arange(n))   # each token exactly once
    xyz = _coords(grid)[parts[..., 0]]                            # [nW, tokens, 3]
    block = xyz // torch.tensor(window)
    assert (block == block[:, :1]).all()                          # one window = one block of the grid
    assert torch.equal(win.merge(parts), ids)


def test_paper_lr_windows_are_the_half_size_example():
    """§2.8: stage-1 LR grid (5,28,16) with windows (1,28,2), (1,4,16), (5,4,4)."""
    assert [lr_window(WINDOWS["stage1"][a]) for a in ("vertical", "horizontal", "temporal")] == \
        [(1, 28, 2), (1, 4, 16), (5, 4, 4)]
    with pytest.raises(ValueError, match="does not tile"):
        Windows((5, 56, 32), (1, 8, 5))


@pytest.mark.parametrize("axis", ["vertical", "horizontal", "temporal"])
def test_windowed_self_attention_changes_only_the_perturbed_tokens_window(axis):
    torch.manual_seed(0)
    grid, window = (4, 8, 8), tuple(TINY_WINDOWS[axis])
    n, i = math.prod(grid), 137
    x = torch.randn(2, n, 16)
    y = x.clone()
    y[:, i] += 1.0
    coords = _coords(grid)
    same = ((coords // torch.tensor(window)) == (coords[i] // torch.tensor(window))).all(-1)
    for win, expect in ((window, same), (None, torch.ones(n, dtype=torch.bool))):  # full attention: the control
        attn = MultiHeadAttention(16, 4, window=win).eval()
        changed = (attn(y, grid=grid) - attn(x, grid=grid)).abs().amax((0, 2)) > 1e-6
        assert torch.equal(changed, expect)


@pytest.mark.parametrize("axis", ["vertical", "horizontal", "temporal"])
def test_windowed_cross_attention_lines_up_with_the_half_size_lr_grid(axis):
    """Perturbing LR token (t, h, w) changes exactly the HR tokens whose window covers the HR region (2h, 2w)."""
    torch.manual_seed(0)
    grid = (4, 8, 8)
    lr_grid = (4, 4, 4)
    window = tuple(TINY_WINDOWS[axis])
    attn = CrossAttention(16, 16, 4, window=window, context_window=lr_window(window)).eval()
    x, ctx = torch.randn(1, math.prod(grid), 16), torch.randn(1, math.prod(lr_grid), 16)
    hr, lr = _coords(grid), _coords(lr_grid)
    for j in (0, 21, 63):
        c2 = ctx.clone()
        c2[:, j] += 1.0
        changed = (attn(x, c2, grid=grid, context_grid=lr_grid) - attn(x, ctx, grid=grid, context_grid=lr_grid)
                   ).abs().amax((0, 2)) > 1e-6
        pixel = lr[j] * torch.tensor([1, 2, 2])   # the LR token's place on the HR grid
        expect = ((hr // torch.tensor(window)) == (pixel // torch.tensor(window))).all(-1)
        assert torch.equal(changed, expect)
    with pytest.raises(ValueError, match="do not pair up"):
        CrossAttention(16, 16, 4, window=window, context_window=lr_grid)(x, ctx, grid=grid, context_grid=lr_grid)


# ------------------------------------------------------------------------------------------ token factorisation
def test_token_factorisation_round_trip_18_bits():
    f = TokenFactorization(18, 2)
    codes = torch.arange(2 ** 18)
    sub = f.split(codes)
    assert sub.shape == (2 ** 18, 2) and int(sub.max()) == 511
    assert torch.equal(sub[:, 0], codes >> 9) and torch.equal(sub[:, 1], codes & 511)   # bits 17..9, 8..0
    assert torch.equal(f.merge(sub), codes)
    assert f.split(torch.tensor([f.mask_id])).tolist() == [[512, 512]]                  # [MASK] in both factors
    with pytest.raises(SRConfigError):
        TokenFactorization(9, 2)


def test_two_head_loss_is_the_sum_of_the_parts_and_the_joint_factorised_cross_entropy():
    torch.manual_seed(0)
    f = TokenFactorization(8, 2)
    B, N = 2, 12
    logits = [torch.randn(B, N, 16), torch.randn(B, N, 16)]
    codes = torch.randint(0, 256, (B, N))
    masked = torch.rand(B, N) < 0.5
    out = factorized_loss(logits, codes, f, masked)
    sub = f.split(codes)
    parts = [F.cross_entropy(lg[masked], sub[masked][:, j]) for j, lg in enumerate(logits)]
    assert torch.allclose(out["head0"], parts[0]) and torch.allclose(out["head1"], parts[1])
    assert torch.allclose(out["loss"], parts[0] + parts[1])
    # the sum is the cross-entropy of the product distribution over all 2^8 codes (log p = log p_hi + log p_lo)
    joint = (logits[0].log_softmax(-1)[..., :, None] + logits[1].log_softmax(-1)[..., None, :]).flatten(-2)
    assert torch.allclose(out["loss"], F.cross_entropy(joint[masked], codes[masked]), atol=1e-5)


def test_loss_tokens_all_weights_every_position_and_masked_only_the_masked_ones():
    """``loss_tokens``: "masked" (MaskGIT) scores the masked positions only, "all" (MAGVIT's mask+recons weighting)
    every HR position, on the same logits and the same mask."""
    from vidgen.lightning_modules.nn.masking import random_token_mask, sample_mask_ratio
    from vidgen.lightning_modules.nn.seeding import step_generator

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batch = {"tokens": torch.randint(0, 256, (2, 4, 8, 8), generator=g),
             "lr_tokens": torch.randint(0, 256, (2, 4, 4, 4), generator=g)}
    hr = batch["tokens"].flatten(1)
    losses = {}
    for mode in ("masked", "all"):
        m = _tiny(loss_tokens=mode, text_dropout=0.0, lr_dropout=0.0, lr_noise=0.0, text_guidance=1.0)
        seen = []
        m.net.register_forward_hook(lambda mod, inp, out: seen.append(out))
        out = m.step_loss(batch, 7)
        gen = step_generator(m.config.seed, 7)
        ratio = sample_mask_ratio(gen, m.config.mask_schedule, hr.shape[1])
        masked = random_token_mask(2, hr.shape[1], ratio, gen, hr.device)
        assert 0 < int(masked.sum()) < masked.numel()
        weight = masked if mode == "masked" else torch.ones_like(masked)
        assert torch.allclose(out["loss"], factorized_loss(seen[0], hr, m.fact, weight)["loss"])
        losses[mode] = float(out["loss"])
    assert abs(losses["masked"] - losses["all"]) > 1e-4
    with pytest.raises(SRConfigError, match="loss_tokens"):
        _tiny(loss_tokens="some")


# ---------------------------------------------------------------------------------------------------- guidance
def test_dual_guidance_formula_and_unit_scales():
    torch.manual_seed(0)
    full, lr_only, none = torch.randn(3, 5, 7).unbind(0)
    assert torch.equal(dual_guidance(full, lr_only, none, 1.0, 1.0), full)
    got = dual_guidance(full, lr_only, none, 4.0, 2.0)
    assert torch.allclose(got, none + 2.0 * (lr_only - none) + 4.0 * (full - lr_only))
    assert torch.allclose(dual_guidance(full, lr_only, None, 8.0, 1.0), lr_only + 8.0 * (full - lr_only))
    # identical conditions: any scale is a no-op
    assert torch.allclose(dual_guidance(full, full, full, 8.0, 2.0), full)


def test_both_guidance_scales_enter_the_model_as_specified():
    torch.manual_seed(0)
    m = _tiny().eval()
    tokens = torch.full((2, 256), m.fact.mask_id)
    lr = torch.randint(0, 256, (2, 64))
    text, tmask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    base = m.guided_logits(tokens, lr, text, tmask, 1.0, 1.0)
    # no text (the null text in both branches): the text scale changes nothing
    plain = m.guided_logits(tokens, lr, None, None, 1.0, 1.0)
    for a, b in zip(plain, m.guided_logits(tokens, lr, None, None, 8.0, 1.0)):
        assert torch.allclose(a, b, atol=1e-5)
    # with a caption the text scale does act, and the LR scale acts through l(no LR, no text)
    t4 = m.guided_logits(tokens, lr, text, tmask, 4.0, 1.0)
    t4l2 = m.guided_logits(tokens, lr, text, tmask, 4.0, 2.0)
    assert not torch.allclose(t4[0], base[0]) and not torch.allclose(t4l2[0], t4[0])
    keep = torch.zeros(2, dtype=torch.bool)
    l_lr = m.net(tokens, lr, text, tmask, keep_text=keep)
    l_none = m.net(tokens, torch.full_like(lr, m.fact.mask_id), text, tmask, keep_text=keep)
    for j in range(2):
        want = l_none[j] + 2.0 * (l_lr[j] - l_none[j]) + 4.0 * (base[j] - l_lr[j])
        assert torch.allclose(t4l2[j], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- training
def test_lr_condition_noise_and_independent_drops():
    m = _tiny(lr_noise=0.2)
    g = torch.Generator().manual_seed(0)
    lr = torch.zeros(1000, 4096, dtype=torch.long)
    frac = (m.noise_lr(lr, g) != 0).float().mean(1)             # uniform resampling hits 0 with prob 1/256
    assert abs(float(frac.mean()) - 0.1 * 255 / 256) < 0.01 and 0.18 < float(frac.max()) < 0.22
    drop_lr, drop_text = m.condition_drops(40000, g)
    assert abs(float(drop_lr.float().mean()) - 0.1) < 0.01 and abs(float(drop_text.float().mean()) - 0.1) < 0.01
    assert abs(float((drop_lr & drop_text).float().mean()) - 0.01) < 0.003   # independent
    v = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    small = bicubic_downsample(v)
    assert small.shape == (1, 3, 2, 4, 4)
    assert torch.allclose(bicubic_downsample(torch.full((1, 3, 2, 8, 8), 0.3)), torch.full((1, 3, 2, 4, 4), 0.3))


def test_config_windows_fit_the_paper_grids_and_bad_ones_name_the_key():
    for stage, grid in PAPER_GRIDS.items():
        VideoPoetSRConfig(stage=stage, visual_codes=2 ** 18, token_grid=list(grid), text_dim=2048).validate()
    with pytest.raises(SRConfigError, match="windows.vertical"):
        VideoPoetSRConfig(stage="stage2", visual_codes=2 ** 18, token_grid=[5, 56, 32], text_dim=2048).validate()
    with pytest.raises(SRConfigError, match="lr_guidance"):
        VideoPoetSRConfig(stage="stage2", visual_codes=2 ** 18, token_grid=[5, 112, 64], text_dim=2048,
                          lr_dropout=0.0, lr_guidance=2.0).validate()


def test_tiny_sr_transformer_overfits_a_few_examples_and_decodes_them():
    torch.manual_seed(0)
    m = _tiny(depth=2, width=64, lr_noise=0.0, text_dropout=0.0, lr_dropout=0.0, text_guidance=1.0, decode_steps=8)
    g = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(0, 256, (4, 4, 8, 8), generator=g),
             "lr_tokens": torch.randint(0, 256, (4, 4, 4, 4), generator=g),
             "text_emb": torch.randn(4, 3, 8, generator=g), "text_len": torch.tensor([3, 3, 2, 1])}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def eval_loss():
        with torch.no_grad():
            return sum(float(m.step_loss(batch, 10_000 + s)["loss"]) for s in range(4)) / 4

    first = eval_loss()
    for step in range(200):
        loss = m.step_loss(batch, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = eval_loss()
    print(f"overfit: loss {first:.3f} -> {last:.3f}")
    assert last < first / 5, (first, last)
    out = m.super_resolve(batch["lr_tokens"], batch, torch.Generator().manual_seed(0), temperature=0.0)
    assert float((out == batch["tokens"]).float().mean()) > 0.5   # chance: 1/256


def test_predict_cascade_runs_the_sr_stages_in_token_space(tmp_path):
    """LM codes (4,4,4) -> stage 1 (4,8,8) -> stage 2 (4,16,16), each stage loaded from its checkpoint."""
    from vidgen.lightning_modules.videopoet import VideoPoet, VideoPoetConfigError

    paths = []
    for i, (grid, windows) in enumerate((([4, 8, 8], TINY_WINDOWS),
                                          ([4, 16, 16], {"vertical": [1, 16, 2], "horizontal": [1, 2, 16],
                                                         "temporal": [4, 4, 4]}))):
        torch.manual_seed(i)
        sr = _tiny(token_grid=grid, windows=windows, decode_steps=3, text_guidance=2.0, lr_guidance=2.0)
        paths.append(str(tmp_path / f"sr{i}.ckpt"))
        torch.save({"hyper_parameters": dict(sr.hparams), "state_dict": sr.state_dict()}, paths[-1])
    lm = VideoPoet(size="tiny", tasks={"t2v": 1.0}, visual_codes=256, text_dim=8, sr_stages=paths)
    base = torch.randint(0, 256, (2, 4, 4, 4))
    batch = {"text_emb": torch.randn(2, 3, 8), "text_len": torch.tensor([3, 2])}
    out = lm.super_resolve(base, batch, torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 16, 16) and 0 <= int(out.min()) and int(out.max()) < 256
    with pytest.raises(VideoPoetConfigError, match="upsamples"):
        lm.super_resolve(torch.randint(0, 256, (2, 4, 8, 8)), batch)
    with pytest.raises(VideoPoetConfigError, match="sr_stages"):
        VideoPoet(size="tiny", tasks={"t2v": 1.0}, visual_codes=256, text_dim=8, sr_stages=[str(tmp_path / "no")])


def test_each_rank_and_micro_batch_draws_its_own_masks_drops_and_noise():
    """§2.8 drops LR and text independently per row: under DDP or gradient accumulation the rows of one step must not
    share their draws. ``(seed, step, stream)`` decides them; stream 0 (one process) keeps the historical key."""
    from types import SimpleNamespace

    from vidgen.lightning_modules.nn.seeding import step_generator, training_stream

    g = torch.Generator().manual_seed(3)
    batch = {"tokens": torch.randint(0, 256, (8, 4, 8, 8), generator=g),
             "lr_tokens": torch.randint(0, 256, (8, 4, 4, 4), generator=g)}
    m = _tiny(lr_dropout=0.5, text_dropout=0.5, lr_noise=0.5)
    draws = {}
    for stream in (0, 0, 1, 2):
        seen = []
        h = m.net.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].clone(), inp[1].clone())))
        m.step_loss(batch, 7, stream)
        h.remove()
        if stream in draws:
            assert all(torch.equal(a, b) for a, b in zip(draws[stream], seen[0])), "same stream, same draws"
        draws[stream] = seen[0]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(draws[a][0], draws[b][0]), "masked HR inputs differ between streams"
        assert not torch.equal(draws[a][1], draws[b][1]), "noised / dropped LR inputs differ between streams"
    assert torch.equal(torch.rand(4, generator=step_generator(5, 7)),
                       torch.rand(4, generator=torch.Generator().manual_seed(5 * 1_000_003 + 7)))
    # rank r, micro-batch i of k accumulated: stream r·k + i
    mod = SimpleNamespace(_trainer=SimpleNamespace(accumulate_grad_batches=4, global_rank=2))
    assert [training_stream(mod, b) for b in (0, 1, 5)] == [8, 9, 9]
    assert training_stream(SimpleNamespace(_trainer=None), 3) == 0
