"""Latte text-to-video (issue 11 §9): the official ``extras=78`` path of models/latte.py, and the released Latte-1
(family='pixart': PixArt-alpha blocks, diffusers ``LatteTransformer3DModel``) with diffusers parity and round trip."""

from __future__ import annotations

import json

import pytest
import torch
from test_latte import _reference_v1, official_shapes, randomize  # tests/ is on sys.path (conftest.py)

from vidgen.lightning_modules.latte import (
    Latte,
    LatteConfig,
    LatteConfigError,
    LattePixArtTransformer,
    LatteTransformer,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


# ----------------------------------------------------------------------------------------------------------------------
# 1. the official extras=78 path (Vchitect/Latte models/latte.py)
# ----------------------------------------------------------------------------------------------------------------------
def extras78_shapes(d: int, p: int, c: int, depth: int, frames: int, tokens: int, text_tokens: int, text_dim: int):
    """Key set and shapes of an official ``Latte(extras=78)`` state dict: the DiT keys of spec §1.10 without the
    label table, plus ``text_embedding_projection`` = Sequential(SiLU, Linear(77 * 768, d)) (index 1 = the Linear)."""
    shapes = official_shapes(d, p, c, depth, None, frames, tokens)
    shapes.update({"text_embedding_projection.1.weight": (d, text_tokens * text_dim),
                   "text_embedding_projection.1.bias": (d,)})
    return shapes


def test_extras78_key_set_is_the_official_xl2_layout():
    with torch.device("meta"):
        net = LatteTransformer(LatteConfig.from_size("XL/2", condition="text"))
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == extras78_shapes(1152, 2, 4, 28, 16, 256, 77, 768)  # Linear(77 * 768, 1152), CLIP ViT-L/14 tokens


def test_extras78_checkpoint_loads_strictly_and_matches_the_official_math(tmp_path):
    d, heads, p, L, D = 32, 4, 2, 5, 6
    shapes = extras78_shapes(d, p, 4, 4, 3, 16, L, D)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    torch.save({"model": {k: torch.zeros(s) for k, s in shapes.items()}, "ema": sd}, tmp_path / "t2v.pt")
    net = LatteTransformer(LatteConfig(input_size=8, patch_size=p, in_channels=4, hidden_size=d, depth=4,
                                       num_heads=heads, num_frames=3, condition="text", text_tokens=L, text_dim=D))
    report = net.load_pretrained(str(tmp_path / "t2v.pt"))
    assert report.kind == "latte" and report.exact and len(report.loaded) == len(shapes)
    x, t, text = torch.randn(2, 3, 4, 8, 8), torch.tensor([5, 901]), torch.randn(2, L, D)
    with torch.no_grad():
        got = net.eval()(x, t, text=text)
        want = _reference_v1(sd, x, t, None, d, heads, p, text=text)  # the official extras=78 math
        # the final layer sees the timestep alone: a zero-gated network (all blocks identity) ignores the caption
        gated = {k: (v * 0 if "blocks." in k and "adaLN_modulation" in k else v) for k, v in sd.items()}
        net.load_pretrained(gated, kind="latte")
        other = net(x, t, text=torch.randn(2, L, D))
        same = net(x, t, text=text)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(other, same)
    with pytest.raises(ValueError, match=r"caption token states \[2, 5, 6\]"):
        net(x, t, text=torch.randn(2, D))  # a pooled embedding is not what extras=78 takes


# ----------------------------------------------------------------------------------------------------------------------
# 2. Latte-1 (family='pixart'): math that needs no diffusers
# ----------------------------------------------------------------------------------------------------------------------
PIX = dict(family="pixart", condition="text", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4,
           num_heads=2, num_frames=3, text_dim=12)


TOL = dict(rtol=1e-4, atol=1e-4)  # the same math through differently shaped (masked / batched) attention calls


def pixart(**kw) -> LattePixArtTransformer:
    return LattePixArtTransformer(LatteConfig(**{**PIX, **kw}))


def test_pixart_fresh_model_predicts_zeros_and_config_errors():
    net = pixart().eval()
    out = net(torch.randn(2, 3, 4, 8, 8), torch.tensor([1, 999]), text=torch.randn(2, 7, 12))
    assert out.shape == (2, 3, 8, 8, 8) and out.abs().max() == 0  # zero final linear (PixArt-alpha init)
    assert [b.cross_attn is not None for b in net.blocks] == [True, False, True, False]  # spatial blocks only
    with pytest.raises(LatteConfigError, match="family='pixart'.*condition='text', got 'class'"):
        LatteConfig(**{**PIX, "condition": "class"})
    with pytest.raises(LatteConfigError, match="variant=1"):
        LatteConfig(**{**PIX, "variant": 2})


def test_pixart_caption_mask_equals_dropping_the_padded_tokens_and_stills_bypass_time():
    net = randomize(pixart(), std=0.2)
    x, t = torch.randn(2, 5, 4, 8, 8), torch.tensor([3, 600])
    text, n = torch.randn(2, 7, 12), torch.tensor([4, 7])
    mask = torch.arange(7)[None] < n[:, None]
    with torch.no_grad():
        masked = net(x[:, :3], t, text=text, text_mask=mask)
        for b in range(2):  # = diffusers' single-prompt pipeline, which cuts the caption at its length
            cut = net(x[b:b + 1, :3], t[b:b + 1], text=text[b:b + 1, : n[b]])
            torch.testing.assert_close(masked[b:b + 1], cut, **TOL)
        # two stills after three video frames: each still is conditioned by its own caption and skips time
        text_img = torch.randn(2, 2, 7, 12)
        joint = net(x, t, text=text, text_image=text_img, use_image_num=2)
        torch.testing.assert_close(joint[:, :3], net(x[:, :3], t, text=text), **TOL)
        for j in range(2):
            alone = net(x[:, 3 + j:4 + j], t, text=text_img[:, j], temporal=False)
            torch.testing.assert_close(joint[:, 3 + j:4 + j], alone, **TOL)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Latte-1: parity and round trip with diffusers' LatteTransformer3DModel
# ----------------------------------------------------------------------------------------------------------------------
def _tiny_diffusers(affine: bool, bias: bool):
    diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed (pip install vidgen[diffusers])")
    torch.manual_seed(0)
    ref = diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=16,
        attention_bias=bias, sample_size=16, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=affine, norm_eps=1e-6, caption_channels=12, video_length=3,
    )
    with torch.no_grad():
        for prm in ref.parameters():  # away from the init so that every weight matters
            prm.add_(torch.randn_like(prm) * 0.1)
    return diffusers, ref.eval()


@pytest.mark.parametrize("affine,bias", [(False, True), (True, False)], ids=["latte1", "affine_nobias"])
def test_diffusers_latte_loads_agrees_and_round_trips(tmp_path, affine, bias):
    diffusers, ref = _tiny_diffusers(affine, bias)
    ref.save_pretrained(tmp_path / "Latte-1" / "transformer")  # the pipeline layout; <dir>/transformer is found
    from vidgen.lightning_modules.latte import latte_kwargs_from_diffusers, read_diffusers

    config, _ = read_diffusers(tmp_path / "Latte-1")
    kw = latte_kwargs_from_diffusers(config)
    assert (kw["depth"], kw["hidden_size"], kw["num_frames"], kw["text_dim"]) == (4, 16, 3, 12)
    for size in (16, 8):  # the trained layout, and a smaller clip (diffusers recomputes its 2D table for it)
        net = LattePixArtTransformer(LatteConfig(**{**kw, "input_size": size})).eval()
        report = net.load_pretrained(str(tmp_path / "Latte-1"))
        assert report.kind == "diffusers" and report.exact
        x, t, ctx = torch.randn(2, 4, 3, size, size), torch.tensor([10, 900]), torch.randn(2, 5, 12)
        with torch.no_grad():
            want = ref(x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            got = net(x.transpose(1, 2), t, text=ctx).transpose(1, 2)  # ours: [B, F, C, H, W]
            img_want = ref(x[:, :, :1], timestep=t, encoder_hidden_states=ctx, enable_temporal_attentions=False).sample
            img_got = net(x[:, :, :1].transpose(1, 2), t, text=ctx, temporal=False).transpose(1, 2)
        assert want.abs().mean() > 0.1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(img_got, img_want, rtol=1e-5, atol=1e-5)
    # export -> diffusers loads it and agrees; the weights are the original ones
    out = net.save_diffusers(tmp_path / "export")
    back = diffusers.LatteTransformer3DModel.from_pretrained(out).eval()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["_class_name"] == "LatteTransformer3DModel"
    assert back.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    with torch.no_grad():
        again = back(x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_diffusers_dir_that_does_not_match_is_a_clear_error(tmp_path):
    _, ref = _tiny_diffusers(False, True)
    ref.save_pretrained(tmp_path / "t")
    with pytest.raises(LatteConfigError, match="depth: checkpoint 4, model 2"):
        LattePixArtTransformer(LatteConfig(**{**PIX, "hidden_size": 16, "depth": 2})).load_pretrained(str(tmp_path / "t"))


# ----------------------------------------------------------------------------------------------------------------------
# the LightningModule with family='pixart': MiniLM token states offline, diffusers directory in and out
# ----------------------------------------------------------------------------------------------------------------------
LM1 = dict(family="pixart", condition="text", size="S", depth=2, hidden_size=32, num_heads=2, num_frames=4,
           resolution=16, vae={"kind": "pixels", "factor": 2}, text_encoder={"kind": "minilm", "max_length": 12},
           sample_steps=3, sampler="ddim", cfg_scale=3.0)


def test_latte1_module_trains_samples_and_exports(tmp_path):
    torch.manual_seed(0)
    model = Latte(**{**LM1, "use_image_num": 1})
    assert isinstance(model.model, LattePixArtTransformer) and model.config.text_dim == 384
    batch = {"video": torch.rand(2, 3, 4, 16, 16) * 2 - 1, "text": ["a red square moving left", "a blue circle"]}
    x0, kwargs = model.model_inputs(batch, train=False)
    assert kwargs["text"].shape == (2, 12, 384) and kwargs["text_mask"].dtype == torch.bool
    assert kwargs["text_mask"].sum(1).tolist()[1] < 12  # MiniLM pads to max_length; the padding is masked
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and model.model.blocks[0].cross_attn.kv_linear.weight.grad is not None
    video = model.generate(batch, generator=torch.Generator().manual_seed(0))
    assert video.shape == (2, 3, 4, 16, 16) and video.abs().max() <= 1
    zero = Latte(**{**LM1, "text_padding": "zero"})
    _, kw = zero.model_inputs(batch, train=False)
    assert "text_mask" not in kw and (kw["text"][kwargs["text_mask"].logical_not()] == 0).all()

    randomize(model.model, seed=1, std=0.1)
    out = model.export_diffusers(tmp_path / "ft")
    # a run checkpoint exports without building the module; EMA weights are preferred
    ckpt = {"state_dict": dict(model.state_dict())}
    model.on_save_checkpoint(ckpt)
    ckpt["state_dict"].update({"_ema." + k: v + 1 for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    torch.save(ckpt, tmp_path / "last.ckpt")
    from safetensors.torch import load_file

    from vidgen.lightning_modules.latte import export_diffusers

    exported = load_file(f"{export_diffusers(tmp_path / 'last.ckpt', tmp_path / 'from_ckpt')}/diffusion_pytorch_model.safetensors")
    raw = load_file(f"{out}/diffusion_pytorch_model.safetensors")
    assert exported.keys() == raw.keys() and all(torch.equal(exported[k], raw[k] + 1) for k in raw)
    assert (tmp_path / "from_ckpt" / "config.json").read_text() == (tmp_path / "ft" / "config.json").read_text()
    again = Latte(**{**LM1, "depth": None, "hidden_size": None, "num_heads": None, "init_from": out})
    assert again.load_report.exact and again.config.depth == 2 and again.config.hidden_size == 32
    for k, v in model.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(LatteConfigError, match=r"depth=4 \(checkpoint: 2\)"):
        Latte(**{**LM1, "depth": 4, "init_from": out})
    with pytest.raises(LatteConfigError, match="family: pixart"):
        Latte(**{**LM1, "family": "dit", "init_from": out})
    with pytest.raises(LatteConfigError, match="T5"):  # checkpoint projects 384-d tokens; the open_clip tower is 32-d
        Latte(**{**LM1, "depth": None, "hidden_size": None, "num_heads": None, "init_from": out,
                 "text_encoder": {"kind": "open_clip", "checkpoint": None}})


def test_latte1_overfits_a_few_captioned_clips():
    """Every part trains: the hybrid loss on a fixed set of (t, noise) falls 5x on two captioned clips."""
    from test_latte import _smooth_clips

    torch.manual_seed(0)
    model = Latte(**{**LM1, "class_dropout_prob": 0.0})
    batch = {"latents": _smooth_clips(2), "text": ["a red square moving left", "a blue circle moving up"]}
    x0, kw = model.model_inputs(batch, train=False)
    g = torch.Generator().manual_seed(0)  # a fixed set of (t, noise) to evaluate the hybrid loss on
    x_eval, kw_eval = x0.repeat(4, 1, 1, 1, 1), {"text": kw["text"].repeat(4, 1, 1), "text_mask": kw["text_mask"].repeat(4, 1)}
    t_eval, n_eval = torch.randint(0, 1000, (8,), generator=g), torch.randn(x_eval.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return model.diffusion.training_losses(model.model, x_eval, kw_eval, t=t_eval, noise=n_eval)["loss"].mean()

    before = eval_loss()
    opt = torch.optim.AdamW(model.model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        model.diffusion.training_losses(model.model, x0, kw)["loss"].mean().backward()
        opt.step()
    model.eval()
    after = eval_loss()
    print(f"hybrid loss {before:.4f} -> {after:.4f}")
    assert after < before / 5, (before, after)
    assert model.model.blocks[0].cross_attn.proj.weight.abs().max() > 0  # left its zero init
