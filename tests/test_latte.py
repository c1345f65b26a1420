"""Latte (spec latte_tora.md §1): variants' mixing patterns, initialisation, official checkpoint layout, an
independent re-derivation of the V1 forward, DiT init, image-video joint training, overfitting, sampling."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidgen.lightning_modules.latte import (
    LATTE_MODELS,
    HeadSplitAttention,
    Latte,
    LatteConfig,
    LatteConfigError,
    LatteTransformer,
    read_checkpoint,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=4, num_frames=4, num_classes=5)


def tiny_net(**kw) -> LatteTransformer:
    return LatteTransformer(LatteConfig(**{**TINY, **kw}))


def randomize(net: torch.nn.Module, seed: int = 0, std: float = 0.3, identity_blocks=()) -> torch.nn.Module:
    """Random values for every trainable weight (zero-inits included); ``identity_blocks`` get zero gates again."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for i in identity_blocks:
            net.blocks[i].adaLN_modulation[-1].weight.zero_()
            net.blocks[i].adaLN_modulation[-1].bias.zero_()
    return net.eval()


def run(net, x, n_img=0, seed=1):
    b = x.shape[0]
    t = torch.tensor([3, 700][:b])
    y = torch.tensor([1, 4][:b])
    y_img = torch.arange(b * n_img).reshape(b, n_img) % 5 if n_img else None
    with torch.no_grad():
        return net(x, t, y=y, y_image=y_img, use_image_num=n_img)


# ----------------------------------------------------------------------------------------------------------------------
# sizes, init
# ----------------------------------------------------------------------------------------------------------------------
def test_size_table_and_xl_parameter_count():
    assert len(LATTE_MODELS) == 12 and LATTE_MODELS["Latte-XL/2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16,
                                                                      "patch_size": 2}
    with torch.device("meta"):
        net = LatteTransformer(LatteConfig.from_size("XL/2", num_classes=101))
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert 0.66e9 < n < 0.68e9  # ~0.67B, the same as DiT-XL/2 (§1.1)
    assert len(net.blocks) == 28 and net.spatial_block_indices() == list(range(0, 28, 2))


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
@pytest.mark.parametrize("extra", [{}, {"patch_embedding": "tube"}, {"temporal_pos": "rope"}, {"conditioning": "tokens"}])
def test_fresh_model_predicts_zeros(variant, extra):
    if extra.get("conditioning") == "tokens" and variant > 2:  # not a silent fallback: a config error
        with pytest.raises(ValueError, match="conditioning='tokens' is implemented for variants 1 and 2"):
            tiny_net(variant=variant, **extra)
        return
    net = tiny_net(variant=variant, **extra).eval()
    n_img = 0 if extra.get("patch_embedding") == "tube" else 2
    x = torch.randn(2, 4 + n_img, 3, 8, 8)
    out = run(net, x, n_img)
    assert out.shape == (2, 4 + n_img, 6, 8, 8)
    assert torch.count_nonzero(out) == 0
    # §1.7: zero-initialised modulations and output linear; fixed sin-cos tables are frozen parameters
    assert not net.pos_embed.requires_grad
    assert all(torch.count_nonzero(b.adaLN_modulation[-1].weight) == 0 for b in net.blocks if hasattr(b, "adaLN_modulation"))


def test_tube_embedding_round_trip_keeps_frame_count():
    net = randomize(tiny_net(patch_embedding="tube", tube_stride=2, num_frames=8))
    x = torch.randn(2, 8, 3, 8, 8)
    tokens = net.x_embedder(x)
    assert tokens.shape == (2 * 4, 16, 32)  # n_f = F / s token frames
    assert net.temp_embed.shape == (1, 4, 32)
    assert run(net, x).shape == (2, 8, 6, 8, 8)  # the transposed conv restores F
    with pytest.raises(LatteConfigError, match="multiple of tube_stride"):
        tiny_net(patch_embedding="tube", tube_stride=3, num_frames=4)


# ----------------------------------------------------------------------------------------------------------------------
# mixing patterns
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [1, 2])
def test_spatial_blocks_never_mix_frames(variant):
    net = tiny_net(variant=variant)
    net = randomize(net, identity_blocks=net.temporal_block_indices())  # temporal blocks = identity
    x = torch.randn(2, 4, 3, 8, 8)
    x2 = x.clone()
    x2[:, 1] += torch.randn(2, 3, 8, 8)
    a, b = run(net, x), run(net, x2)
    torch.testing.assert_close(a[:, [0, 2, 3]], b[:, [0, 2, 3]], rtol=0, atol=1e-6)
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", [1, 2])
def test_temporal_blocks_never_mix_positions(variant):
    net = tiny_net(variant=variant)
    net = randomize(net, identity_blocks=net.spatial_block_indices())  # spatial blocks = identity
    x = torch.randn(2, 4, 3, 8, 8)
    x2 = x.clone()
    x2[:, 0, :, :2, :2] += torch.randn(2, 3, 2, 2)  # the first 2x2 patch of frame 0
    a, b = run(net, x), run(net, x2)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[:2, :2] = False
    torch.testing.assert_close(a[..., outside], b[..., outside], rtol=0, atol=1e-6)
    assert (a[:, 2, :, :2, :2] - b[:, 2, :, :2, :2]).abs().max() > 1e-2  # other frames see it at that position


@pytest.mark.parametrize("variant,order", [(1, "ststst"), (2, "sssttt")])
def test_block_order_and_layouts(variant, order):
    net = tiny_net(variant=variant, depth=6)
    seen = []
    for blk in net.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    run(net, torch.randn(2, 6, 3, 8, 8), n_img=2)
    spatial, temporal = (2 * 6, 16, 32), (2 * 16, 4, 32)  # (B F_all) x S  and  (B S) x F_video (stills excluded)
    assert seen == [spatial if c == "s" else temporal for c in order]


def test_v4_splits_heads_between_space_and_time():
    torch.manual_seed(0)
    attn = HeadSplitAttention(16, 4)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(16))
        attn.proj.bias.zero_()
    b, f, s = 2, 3, 5
    x = torch.randn(b * f, s, 16)
    out = attn(x, batch=b, n_video=f)
    q, k, v = attn.qkv(x).reshape(b * f, s, 3, 4, 4).permute(2, 0, 3, 1, 4)

    def softmax_attn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v

    spatial = softmax_attn(q[:, :2], k[:, :2], v[:, :2])  # heads 0, 1 within a frame
    torch.testing.assert_close(out[..., :8], spatial.transpose(1, 2).reshape(b * f, s, 8), rtol=1e-5, atol=1e-5)
    qt, kt, vt = (z[:, 2:].reshape(b, f, 2, s, 4).permute(0, 3, 2, 1, 4) for z in (q, k, v))  # b s h f e
    temporal = softmax_attn(qt, kt, vt).permute(0, 3, 1, 2, 4).reshape(b * f, s, 8)  # heads 2, 3 across frames
    torch.testing.assert_close(out[..., 8:], temporal, rtol=1e-5, atol=1e-5)
    # a still (frame past n_video) passes its temporal-head values through
    out2 = attn(x, batch=b, n_video=2)
    vt_still = v[:, 2:].reshape(b, f, 2, s, 4)[:, 2].permute(0, 2, 1, 3).reshape(b, s, 8)
    torch.testing.assert_close(out2.reshape(b, f, s, 16)[:, 2, :, 8:], vt_still, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
def test_image_frames_bypass_temporal_mixing(variant):
    net = randomize(tiny_net(variant=variant))
    x = torch.randn(2, 6, 3, 8, 8)  # 4 video frames + 2 stills
    base = run(net, x, n_img=2)
    still = x.clone()
    still[:, 4] += torch.randn(2, 3, 8, 8)
    out = run(net, still, n_img=2)
    torch.testing.assert_close(out[:, [0, 1, 2, 3, 5]], base[:, [0, 1, 2, 3, 5]], rtol=0, atol=1e-6)
    video = x.clone()
    video[:, 0] += torch.randn(2, 3, 8, 8)
    out = run(net, video, n_img=2)
    torch.testing.assert_close(out[:, 4:], base[:, 4:], rtol=0, atol=1e-6)
    assert (out[:, 1:4] - base[:, 1:4]).abs().max() > 1e-2  # video frames do mix


def test_rope_replaces_temp_embed():
    net = tiny_net(temporal_pos="rope")
    assert "temp_embed" not in net.state_dict()
    assert net.blocks[1].attn.rope is not None and net.blocks[0].attn.rope is None


# ----------------------------------------------------------------------------------------------------------------------
# exactness: official key set, independent re-derivation of the forward
# ----------------------------------------------------------------------------------------------------------------------
def official_shapes(d: int, p: int, c: int, depth: int, k: int | None, frames: int, tokens: int) -> dict:
    """The key set and shapes of an official Latte checkpoint, written out from spec §1.10."""
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "pos_embed": (1, tokens, d), "temp_embed": (1, frames, d),
        "final_layer.linear.weight": (p * p * 2 * c, d), "final_layer.linear.bias": (p * p * 2 * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    if k is not None:
        shapes["y_embedder.embedding_table.weight"] = (k + 1, d)
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d), f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def test_official_key_set_xl2_ucf101():
    with torch.device("meta"):
        net = LatteTransformer(LatteConfig.from_size("XL/2", num_classes=101))
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == official_shapes(1152, 2, 4, 28, 101, 16, 256)
    with torch.device("meta"):
        uncond = LatteTransformer(LatteConfig.from_size("XL/2", condition="none"))  # ffs / sky / taichi
    assert {k: tuple(v.shape) for k, v in uncond.state_dict().items()} == official_shapes(1152, 2, 4, 28, None, 16, 256)


def test_official_checkpoint_loads_strictly_prefers_ema_and_aliases_time_embed(tmp_path):
    shapes = official_shapes(32, 2, 4, 4, 5, 4, 16)
    g = torch.Generator().manual_seed(0)
    ema = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    raw = {k: torch.zeros(s) for k, s in shapes.items()}
    path = tmp_path / "ucf101.pt"
    torch.save({"model": raw, "ema": ema, "args": argparse.Namespace(model="Latte-XL/2")}, path)
    net = LatteTransformer(LatteConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4,
                                       num_frames=4, num_classes=5))
    report = net.load_pretrained(str(path))
    assert report.kind == "latte" and not (report.missing or report.unexpected or report.mismatched)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ema[k])
    legacy = dict(ema)
    legacy["time_embed"] = legacy.pop("temp_embed")
    torch.save({"ema": legacy}, tmp_path / "legacy.pt")
    assert "temp_embed" in read_checkpoint(tmp_path / "legacy.pt")
    net.load_pretrained(str(tmp_path / "legacy.pt"), kind="latte")
    extra = dict(ema, **{"blocks.4.attn.qkv.weight": torch.zeros(96, 32)})
    with pytest.raises(KeyError, match="unexpected"):
        net.load_pretrained(extra, kind="latte")


def _reference_v1(sd: dict, x, t, y, d: int, heads: int, p: int, text=None):
    """Latte V1 forward written out with plain tensor ops from spec §1.2 (every spatial + temporal block pair).

    ``y``: class labels (c = t_emb + y_emb everywhere). ``text``: the official ``extras=78`` path instead:
    c = t_emb + Linear(SiLU(text.reshape(B, -1))) in the blocks, and the final layer modulated by t_emb alone."""
    B, Fr, C, H, W = x.shape
    g = H // p
    S = g * g

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def block(h, c, pre):
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), pre + "adaLN_modulation.1").chunk(6, dim=1)
        n, L, _ = h.shape
        a = F.layer_norm(h, (d,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(a, pre + "attn.qkv").reshape(n, L, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(n, L, d), pre + "attn.proj")
        m = F.layer_norm(h, (d,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        m = lin(F.gelu(lin(m, pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
        return h + g2[:, None] * m

    tok = F.conv2d(x.reshape(B * Fr, C, H, W), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    tf = torch.cat([torch.cos(t.float()[:, None] * freqs), torch.sin(t.float()[:, None] * freqs)], dim=1)
    t_emb = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    if text is not None:
        c, c_final = t_emb + lin(F.silu(text.reshape(B, -1)), "text_embedding_projection.1"), t_emb
    else:
        c = c_final = t_emb + sd["y_embedder.embedding_table.weight"][y]
    c_spatial, c_temporal = c.repeat_interleave(Fr, 0), c.repeat_interleave(S, 0)
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(0, n_blocks, 2):
        tok = block(tok, c_spatial, f"blocks.{i}.")
        tok = tok.reshape(B, Fr, S, d).permute(0, 2, 1, 3).reshape(B * S, Fr, d)
        if i == 0:
            tok = tok + sd["temp_embed"]
        tok = block(tok, c_temporal, f"blocks.{i + 1}.")
        tok = tok.reshape(B, S, Fr, d).permute(0, 2, 1, 3).reshape(B * Fr, S, d)
    shift, scale = lin(F.silu(c_final.repeat_interleave(Fr, 0)), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(F.layer_norm(tok, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B * Fr, g, g, p, p, -1)).reshape(B * Fr, -1, H, W)
    return out.reshape(B, Fr, -1, H, W)


def _mae_2d(d: int, g: int) -> np.ndarray:
    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    return np.concatenate([one(d // 2, grid[0]), one(d // 2, grid[1])], axis=1)


def test_v1_forward_matches_independent_rederivation():
    d, heads, p = 32, 4, 2
    net = randomize(LatteTransformer(LatteConfig(input_size=8, patch_size=p, in_channels=4, hidden_size=d, depth=2,
                                                 num_heads=heads, num_frames=3, num_classes=5)), std=0.2)
    np.testing.assert_allclose(net.pos_embed[0].numpy(), _mae_2d(d, 4), atol=1e-6)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    x, t, y = torch.randn(2, 3, 4, 8, 8), torch.tensor([5, 901]), torch.tensor([0, 3])
    with torch.no_grad():
        got = net(x, t, y=y)
        want = _reference_v1(sd, x, t, y, d, heads, p)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dit_init_drops_label_table_on_class_mismatch():
    shapes = official_shapes(32, 2, 4, 4, 9, 4, 16)  # "ImageNet" DiT: 9 classes here, no temp_embed
    del shapes["temp_embed"]
    g = torch.Generator().manual_seed(1)
    dit = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    net = LatteTransformer(LatteConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4,
                                       num_frames=4, num_classes=5))
    temp = net.temp_embed.clone()
    table = net.y_embedder.embedding_table.weight.clone()
    report = net.load_pretrained(dit)
    assert report.kind == "dit"
    assert [k for k, *_ in report.mismatched] == ["y_embedder.embedding_table.weight"]
    assert [k for k, _ in report.missing] == ["temp_embed"]
    torch.testing.assert_close(net.temp_embed, temp)
    torch.testing.assert_close(net.y_embedder.embedding_table.weight, table)
    torch.testing.assert_close(net.blocks[3].mlp.fc2.weight, dit["blocks.3.mlp.fc2.weight"])  # odd DiT block -> temporal
    text = report.table()
    assert "shape differs (dropped)" in text and "[9+1, 32]".replace("9+1", "10") in text and "temp_embed" in text
    with pytest.raises(LatteConfigError, match="variant 3"):
        tiny_net(variant=3, in_channels=4).load_pretrained(dit, kind="dit")


# ----------------------------------------------------------------------------------------------------------------------
# the LightningModule: config errors, training, sampling
# ----------------------------------------------------------------------------------------------------------------------
LM = dict(size="S", depth=2, hidden_size=32, num_heads=2, num_frames=4, resolution=16, num_classes=5,
          vae={"kind": "pixels", "factor": 2}, sample_steps=4)


@pytest.mark.parametrize("bad,match", [
    (dict(variant=5), r"variant=5 is not allowed; choose one of \[1, 2, 3, 4\]"),
    (dict(patch_size=4, resolution=12), "not divisible by patch_size 4"),
    (dict(conditioning="tokens", variant=4), "variants 1 and 2"),
    (dict(condition="none", cfg_scale=4.0), "unconditional"),
    (dict(patch_embedding="tube", use_image_num=2), "uniform"),
    (dict(resolution=[16, 32]), "square"),
    (dict(vae={"kind": "diffusers"}), "needs vae.path"),
])
def test_config_errors_are_clear(bad, match):
    with pytest.raises(LatteConfigError, match=match):
        Latte(**{**LM, **bad})


def test_bad_literal_is_reported_with_allowed_values():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Latte, "model")
    with pytest.raises(Exception, match=r"Literal\[1, 2, 3, 4\]"):
        parser.parse_args(["--model.variant=7"])
    ok = parser.parse_args(["--model.variant=3", "--model.conditioning=tokens"])
    assert ok.model.variant == 3


def _smooth_clips(n: int) -> torch.Tensor:
    """Low-frequency moving patterns, one per clip: ``[n, 3, 4, 8, 8]`` cached latents."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    b, c, f = (torch.arange(k, dtype=torch.float32) for k in (n, 3, 4))
    b, c, f = b[:, None, None, None, None] + 1, c[None, :, None, None, None], f[None, None, :, None, None]
    return torch.sin(0.8 * xx + 0.5 * b * yy + 0.7 * f * b + c)


def test_tiny_latte_overfits_a_few_latent_clips():
    torch.manual_seed(0)
    model = Latte(**{**LM, "hidden_size": 64, "num_heads": 4, "class_dropout_prob": 0.0})
    batch = {"latents": _smooth_clips(4), "label": torch.arange(4)}
    opt = torch.optim.AdamW(model.model.parameters(), lr=3e-3)
    x0, kwargs = model.model_inputs(batch, train=False)
    g = torch.Generator().manual_seed(0)  # a fixed set of (t, noise) to evaluate the hybrid loss on
    x0, y = x0.repeat(8, 1, 1, 1, 1), kwargs["y"].repeat(8)
    t_eval, n_eval = torch.randint(0, 1000, (32,), generator=g), torch.randn(x0.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return model.diffusion.training_losses(model.model, x0, {"y": y}, t=t_eval, noise=n_eval)["loss"].mean()

    before = eval_loss()
    model.train()
    for _ in range(250):
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()
    after = eval_loss()
    assert after < before / 5, (before, after)


def test_image_video_joint_training_step_and_generate(tmp_path):
    torch.manual_seed(0)
    model = Latte(**{**LM, "use_image_num": 2, "cfg_scale": 3.0, "sampler": "ddim"})
    batch = {"video": torch.rand(3, 3, 4, 16, 16) * 2 - 1, "label": torch.tensor([1, -1, 4]), "text": [""] * 3,
             "key": ["a", "b/c", "d"]}
    x0, kwargs = model.model_inputs(batch, train=True)
    assert x0.shape == (3, 6, 3, 8, 8) and kwargs["y_image"].shape == (3, 2) and kwargs["use_image_num"] == 2
    # stills come from other clips of the batch and carry those clips' labels
    for b in range(3):
        for j in range(2):
            src = [i for i in range(3) if i != b and any(torch.equal(x0[b, 4 + j], x0[i, f]) for f in range(4))]
            assert src and kwargs["y_image"][b, j] == batch["label"][src[0]]
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    g = torch.Generator().manual_seed(0)
    video = model.generate(num_samples=2, generator=g)
    assert video.shape == (2, 3, 4, 16, 16) and video.abs().max() <= 1
    pred = model.predict_step(batch, 0)  # tensors + metadata; the PredictionWriter callback writes files
    assert pred["videos"].shape == (3, 3, 4, 16, 16) and pred["keys"] == ["a", "b/c", "d"]
    assert pred["labels"][0] == 1 and pred["labels"][2] == 4 and 0 <= pred["labels"][1] < LM["num_classes"]


def test_text_conditional_latte_with_open_clip_tiny_tower():
    model = Latte(**{**LM, "condition": "text", "cfg_scale": 2.0, "use_image_num": 1})
    enc = model.text_encoder  # official extras=78: the flattened token states (77 x width), not a pooled vector
    assert model.model.text_embedding_projection[1].in_features == enc.max_length * enc.token_dim == 77 * 32
    batch = {"video": torch.rand(2, 3, 4, 16, 16) * 2 - 1, "text": ["a red square", "a blue circle"],
             "label": torch.tensor([-1, -1])}
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    assert model.generate(batch).shape == (2, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="captions"):
        model.generate(None, num_samples=2)


def test_kl_tokenizer_vae_latents_and_frozen_weights_left_out_of_checkpoints(tmp_path):
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    tok = VideoTokenizer(arch={"dims": 2, "filters": 8, "channel_multipliers": [1, 2], "temporal_downsample": [False],
                               "num_res_blocks": 1, "norm_groups": 4, "zero_centered": True},
                         bottleneck={"kind": "kl", "dim": 4}, discriminator={"enabled": False},
                         loss={"perceptual_weight": 0}, num_frames=4, resolution=16)
    path = tmp_path / "tokenizer.ckpt"
    torch.save({"hyper_parameters": dict(tok.hparams), "state_dict": tok.state_dict()}, path)
    with pytest.warns(UserWarning, match="no EMA"):
        model = Latte(**{**LM, "vae": {"kind": "tokenizer", "path": str(path), "scale_factor": 0.5}})
    assert (model.config.in_channels, model.config.input_size) == (4, 8)  # KL latents, spatial factor 2
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        want = tok.encode(video, sample=False)
    model.vae.config.sample = False
    torch.testing.assert_close(model.latents({"video": video}), want.permute(0, 2, 1, 3, 4) * 0.5)
    # cached latents (``vidgen tokenize`` writes the raw tokenizer latents) give the same model input
    torch.testing.assert_close(model.latents({"latents": want}), model.latents({"video": video}))
    sd = model.state_dict()
    assert not [k for k in sd if k.startswith("vae.")] and any(k.startswith("model.") for k in sd)
    model.load_state_dict(sd, strict=True)  # the frozen VAE reloads from its path, not from the checkpoint
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert all(p.requires_grad is False or n.startswith("model.") for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------------------------------
def _recipes():
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[1].glob("configs/latte/*.yaml"))
    return [p for p in paths if "vidgen.lightning_modules.latte.Latte" in p.read_text()]  # not the VAE recipes


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.stem)
def test_recipes_name_real_arguments(path):
    import inspect

    import yaml

    from vidgen.datamodules import VideoDataModule

    cfg = yaml.safe_load(path.read_text())
    assert cfg["model"]["class_path"] == "vidgen.lightning_modules.latte.Latte"
    model_args, data_args = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert set(model_args) <= set(inspect.signature(Latte.__init__).parameters)
    assert set(data_args) <= set(inspect.signature(VideoDataModule.__init__).parameters)
    assert data_args["num_frames"] == (8 if path.stem.endswith("_tiny") else 16)
    if not path.stem.endswith("_tiny"):  # official data settings (§1.11); Latte-1 was released at 512 px
        assert (data_args["frame_stride"], data_args["resolution"]) == (3, 512 if path.stem == "t2v_latte1" else 256)
        assert data_args["flip"] == (path.stem not in ("sky", "t2v", "t2v_latte1"))
    linked = {k: data_args[k] for k in ("num_frames", "resolution")}
    if path.stem.endswith("_tiny"):
        model = Latte(**model_args, **linked)  # builds (pixel stand-in VAE, random tiny text tower)
        assert model.config.input_size == 8
    else:
        with pytest.raises(LatteConfigError, match="does not exist"):  # the pretrained VAE path is not here
            Latte.validate_config({**model_args, **linked})


def test_diffusers_autoencoder_kl_from_a_local_dir_per_frame(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from vidgen.lightning_modules.nn.vae import LatentAutoencoder

    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")  # the layout of a pipeline directory: <path>/vae
    ae = LatentAutoencoder({"kind": "diffusers", "path": str(tmp_path), "sample": False})
    assert (ae.latent_channels, ae.spatial_factor, ae.scale_factor, ae.from_file) == (4, 2, 0.18215, True)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    z = ae.encode(video)
    with torch.no_grad():
        frames = video.permute(0, 2, 1, 3, 4).reshape(8, 3, 16, 16)
        want = vae.encode(frames).latent_dist.mode() * 0.18215  # Latte: per frame, x 0.18215
        back = vae.decode(want / 0.18215).sample
    torch.testing.assert_close(z.permute(0, 2, 1, 3, 4).reshape(8, 4, 8, 8), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.decode(z), back.reshape(2, 4, 3, 16, 16).permute(0, 2, 1, 3, 4), rtol=1e-4, atol=1e-4)
