"""SEED-Voken (Open-MAGVIT2) video tokenizer checkpoints load into our MAGVIT-v2 tokenizer (issue 15 §2, interop).

The reference below is an independent float64 restatement of the Open-MAGVIT2 video tokenizer's forward as read in
TencentARC/SEED-Voken (``src/Open_MAGVIT2``: ``improved_video_model.py`` Encoder/Decoder, ``lookup_free_quantize.py``
LFQ), written functionally over a state dict with THEIR key names.  Facts it encodes: causal 3D convs zero-pad k_t-1
frames in front and k//2 on both sides of H and W (also when strided); GroupNorm(32, eps 1e-6) over all frames;
time is downsampled where the channel multiplier is not 1; the decoder's adaptive GroupNorm is
GN(x)·Linear_γ(sqrt(var_unbiased(q) + eps)) + Linear_β(mean(q)) over (T, H, W), once per level and not before the
middle blocks; depth-to-space views channels as (t, h, w, c); after a temporal ×2 the second frame is dropped (a
single latent frame keeps only the first); LFQ is sign (0 -> -1) with index sum_d [z_d > 0] 2^d.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from vidgen.lightning_modules.nn.conv3d import ConfigError
from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/videopoet/tokenizer_seed_voken_tiny.yaml"


def tiny_args(**over) -> dict:
    args = yaml.safe_load(TINY.read_text())["model"]["init_args"]
    return {**args, **over}


# ------------------------------------------------------------------------------------------------------ their layout
def seed_voken_shapes(ch: int, mult: tuple[int, ...], n: int, z: int, cin: int = 3, cout: int = 3,
                      image: bool = False) -> dict:
    """Generator key -> shape of a SEED-Voken ``video_lfqgan.VQModel`` (ddconfig ch / ch_mult / num_res_blocks /
    z_channels), or of the image ``lfqgan.VQModel`` (nn.Conv2d, no ``.conv_1``), as their modules name them."""
    shapes = {}

    def conv(name, co, ci, k, bias):
        name = name if image else f"{name}.conv_1"
        shapes[f"{name}.weight"] = (co, ci, k, k) if image else (co, ci, k, k, k)
        if bias:
            shapes[f"{name}.bias"] = (co,)

    def gn(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def res(name, ci, co):
        gn(f"{name}.norm1", ci)
        gn(f"{name}.norm2", co)
        conv(f"{name}.conv1", co, ci, 3, False)
        conv(f"{name}.conv2", co, co, 3, False)
        if ci != co:
            conv(f"{name}.nin_shortcut", co, ci, 1, False)

    L = len(mult)
    conv("encoder.conv_in", ch, cin, 3, False)
    bi = ch
    for i in range(L):
        for j in range(n):
            res(f"encoder.down.{i}.block.{j}", bi, ch * mult[i])
            bi = ch * mult[i]
        if i < L - 1:
            conv(f"encoder.down.{i}.downsample", bi, bi, 3, True)
    for j in range(n):
        res(f"encoder.mid_block.{j}", bi, bi)
    gn("encoder.norm_out", bi)
    conv("encoder.conv_out", z, bi, 1, True)
    bi = ch * mult[-1]
    conv("decoder.conv_in", bi, z, 3, True)
    for j in range(n):
        res(f"decoder.mid_block.{j}", bi, bi)
    for i in reversed(range(L)):
        for g in ("gamma", "beta"):
            shapes[f"decoder.adaptive.{i}.{g}.weight"], shapes[f"decoder.adaptive.{i}.{g}.bias"] = (bi, z), (bi,)
        for j in range(n):
            res(f"decoder.up.{i}.block.{j}", bi, ch * mult[i])
            bi = ch * mult[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv1", bi * (1 if image or mult[i - 1] == 1 else 2) * 4, bi, 3, True)
    gn("decoder.norm_out", bi)
    conv("decoder.conv_out", cout, bi, 3, True)
    return shapes


def random_state(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if len(s) > 1:  # kernels / Linear: unit-variance outputs
            out[k] = torch.randn(s, generator=g) / (torch.tensor(s[1:]).prod().float().sqrt())
        elif k.endswith("weight") or ".gamma.bias" in k:
            out[k] = 1 + 0.2 * torch.randn(s, generator=g)
        else:
            out[k] = 0.2 * torch.randn(s, generator=g)
    return out


def checkpoint(raw: dict, ema: dict | None) -> dict:
    """A Lightning file as SEED-Voken writes it: generator, EMA buffers (dots removed), discriminator / LPIPS."""
    sd = dict(raw)
    g = torch.Generator().manual_seed(9)
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, 4, generator=g)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    if ema is not None:
        sd.update({"model_ema." + k.replace(".", ""): v for k, v in ema.items()})
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.999), torch.tensor(-1, dtype=torch.int)
    return {"epoch": 3, "global_step": 1234, "state_dict": sd}


# ------------------------------------------------------------------------------------------------- their forward
def _conv(sd, name, x, stride=(1, 1, 1)):
    if f"{name}.weight" in sd:  # the image model's nn.Conv2d(padding=k//2)
        w, b = sd[f"{name}.weight"], sd.get(f"{name}.bias")
        return F.conv2d(x, w, b, stride[1:], padding=w.shape[-1] // 2)
    w, b = sd[f"{name}.conv_1.weight"], sd.get(f"{name}.conv_1.bias")
    kt, kh, kw = w.shape[2:]
    return F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), w, b, stride)


def _gn(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)


def _res(sd, name, x):
    h = _conv(sd, f"{name}.conv1", F.silu(_gn(sd, f"{name}.norm1", x)))
    h = _conv(sd, f"{name}.conv2", F.silu(_gn(sd, f"{name}.norm2", h)))
    has_shortcut = any(k.startswith(f"{name}.nin_shortcut.") for k in sd)
    return (_conv(sd, f"{name}.nin_shortcut", x) if has_shortcut else x) + h


def ref_encode(sd, x, mult, n, image=False):
    x = _conv(sd, "encoder.conv_in", x)
    for i, m in enumerate(mult):
        for j in range(n):
            x = _res(sd, f"encoder.down.{i}.block.{j}", x)
        if i < len(mult) - 1:
            x = _conv(sd, f"encoder.down.{i}.downsample", x, (1 if image or m == 1 else 2, 2, 2))
    for j in range(n):
        x = _res(sd, f"encoder.mid_block.{j}", x)
    return _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", x)))


def ref_lfq(z):
    q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
    idx = ((z > 0).long() * (2 ** torch.arange(z.shape[1])).view(1, -1, *[1] * (z.dim() - 2))).sum(1)
    return q, idx


def ref_decode(sd, q, mult, n, image=False):
    flat = q.flatten(2)
    std, mean = (flat.var(-1) + 1e-6).sqrt(), flat.mean(-1)
    x = _conv(sd, "decoder.conv_in", q)
    for j in range(n):
        x = _res(sd, f"decoder.mid_block.{j}", x)
    for i in reversed(range(len(mult))):
        a = f"decoder.adaptive.{i}"
        scale = std @ sd[f"{a}.gamma.weight"].T + sd[f"{a}.gamma.bias"]
        shift = mean @ sd[f"{a}.beta.weight"].T + sd[f"{a}.beta.bias"]
        ones = [1] * (x.dim() - 2)
        x = F.group_norm(x, 32, eps=1e-6) * scale.view(*scale.shape, *ones) + shift.view(*shift.shape, *ones)
        for j in range(n):
            x = _res(sd, f"decoder.up.{i}.block.{j}", x)
        if i > 0 and image:  # depth_to_space: channels viewed as (h, w, c)
            y = _conv(sd, f"decoder.up.{i}.upsample.conv1", x)
            B, C, H, W = y.shape
            x = y.view(B, 2, 2, C // 4, H, W).permute(0, 3, 4, 1, 5, 2).reshape(B, C // 4, 2 * H, 2 * W)
        elif i > 0:
            tb = 1 if mult[i - 1] == 1 else 2
            y = _conv(sd, f"decoder.up.{i}.upsample.conv1", x)
            B, C, T, H, W = y.shape
            y = y.view(B, tb, 2, 2, C // (4 * tb), T, H, W).permute(0, 4, 5, 1, 6, 2, 7, 3)
            x = y.reshape(B, C // (4 * tb), T * tb, 2 * H, 2 * W)
            if tb > 1:
                x = torch.cat([x[:, :, :1], x[:, :, 2:]], 2) if x.shape[2] > 2 else x[:, :, :1]
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", x)))


# --------------------------------------------------------------------------------------------------------- tests
def _setup(tmp_path, ema=True):
    a = tiny_args()
    arch, bits = a["arch"], int(a["bottleneck"]["codebook_size"]).bit_length() - 1
    mult, n = tuple(arch["channel_multipliers"]), arch["num_res_blocks"]
    shapes = seed_voken_shapes(arch["filters"], mult, n, bits)
    raw, avg = random_state(shapes, 0), random_state(shapes, 1)
    path = tmp_path / "open_magvit2_video.ckpt"
    torch.save(checkpoint(raw, avg if ema else None), path)
    return a, mult, n, raw, avg, path


def test_seed_voken_checkpoint_loads_strictly_and_matches_their_forward(tmp_path, capsys):
    a, mult, n, raw, avg, path = _setup(tmp_path)
    tok = VideoTokenizer(**tiny_args(init_from=str(path)))  # the recipe, as `vidgen fit` builds it
    table = capsys.readouterr().out
    r = tok.load_report
    assert r.exact and len(r.loaded) == len(raw), table
    assert "EMA weights" in r.kind and "4 training-only tensors skipped" in r.kind and "loaded" in table
    tok = tok.double().eval()
    for weights, sd in (("auto", avg), ("raw", raw)):  # auto = their EMA weights (what their scripts reconstruct with)
        if weights == "raw":
            tok.load_seed_voken(str(path), weights="raw")
        sd64 = {k: v.double() for k, v in sd.items()}
        for T in (5, 1):  # a clip (1 + 2·2 frames -> 3 latent frames) and a still image
            x = torch.rand(2, 3, T, 16, 16, generator=torch.Generator().manual_seed(T), dtype=torch.float64) * 2 - 1
            with torch.no_grad():
                z_ref = ref_encode(sd64, x, mult, n)
                q_ref, idx_ref = ref_lfq(z_ref)
                y_ref = ref_decode(sd64, q_ref, mult, n)
                z = tok.encoder(tok._to_net(x))
                idx = tok.encode(x)
                y = tok.decode(idx)
            assert z.shape == z_ref.shape and (z - z_ref).abs().max() < 1e-5
            assert torch.equal(idx, idx_ref), "token indices (bit order / sign) differ"
            assert y.shape == x.shape and (y - y_ref).abs().max() < 1e-5, (weights, T, (y - y_ref).abs().max())
            assert idx.unique().numel() > 1 and y_ref.std() > 0.1  # a non-degenerate comparison


def test_seed_voken_image_tokenizer_loads_into_the_per_frame_image_model(tmp_path):
    """Open-MAGVIT2 image tokenizers (lfqgan.VQModel, 2D) load into our dims-2 model; a clip is tokenised frame by
    frame exactly as their image model tokenises each frame (GroupNorm and AdaGN statistics per frame)."""
    a = tiny_args(inference_only=True)
    a["arch"] = {**a["arch"], "dims": 2, "norm_per_frame": None, "temporal_downsample": [False, False]}
    mult, n, bits = tuple(a["arch"]["channel_multipliers"]), a["arch"]["num_res_blocks"], 10
    sd = random_state(seed_voken_shapes(a["arch"]["filters"], mult, n, bits, image=True), 3)
    torch.save(checkpoint(sd, None), tmp_path / "open_magvit2_image.ckpt")
    tok = VideoTokenizer(**a)
    assert tok.load_seed_voken(str(tmp_path / "open_magvit2_image.ckpt")).exact
    tok = tok.double().eval()
    sd64 = {k: v.double() for k, v in sd.items()}
    x = torch.rand(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        idx, y = tok.encode(x), tok.decode(tok.encode(x))
        for t in range(3):
            q, idx_ref = ref_lfq(ref_encode(sd64, x[:, :, t], mult, n, image=True))
            assert torch.equal(idx[:, t], idx_ref)
            assert (y[:, :, t] - ref_decode(sd64, q, mult, n, image=True)).abs().max() < 1e-5
    with pytest.raises(ConfigError, match=r"norm_per_frame: False \(the Open-MAGVIT2 video layout\)"):
        VideoTokenizer.validate_config(tiny_args(arch={**a["arch"], "dims": 3}, init_from=str(tmp_path / "x")))


def test_raw_only_checkpoint_and_weight_choice(tmp_path):
    a, mult, n, raw, avg, path = _setup(tmp_path, ema=False)
    tok = VideoTokenizer(**tiny_args(inference_only=True))
    r = tok.load_seed_voken(str(path))
    assert r.exact and "raw weights" in r.kind
    assert torch.equal(tok.encoder.conv_in.weight, raw["encoder.conv_in.conv_1.weight"])
    with pytest.raises(ValueError, match="no EMA weights"):
        tok.load_seed_voken(str(path), weights="ema")
    # a recipe naming the checkpoint is a frozen tokenizer (vidgen tokenize --checkpoint, VideoPoet tokenizer_path)
    recipe = yaml.safe_load(TINY.read_text())
    recipe["model"]["init_args"]["init_from"] = str(path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    frozen = VideoTokenizer.load_frozen(str(tmp_path / "recipe.yaml"))
    assert frozen.frozen and not frozen.training and frozen.discriminator is None
    assert frozen.codebook_size == 1024 and frozen.token_shape(frozen.num_frames, 32, 32) == (5, 8, 8)
    assert torch.equal(frozen.decoder.conv_out.weight, raw["decoder.conv_out.conv_1.weight"])
    with pytest.raises(ConfigError, match="needs model.init_args.init_from"):
        VideoTokenizer.load_frozen(str(TINY))


def test_mismatched_checkpoints_and_layouts_fail_in_one_line(tmp_path):
    a = tiny_args()
    arch = a["arch"]
    bits = int(a["bottleneck"]["codebook_size"]).bit_length() - 1
    tok = VideoTokenizer(**tiny_args(inference_only=True))
    # a checkpoint with a different code width (z_channels) than the config
    wrong = random_state(seed_voken_shapes(arch["filters"], tuple(arch["channel_multipliers"]),
                                           arch["num_res_blocks"], bits + 2), 0)
    torch.save(checkpoint(wrong, None), tmp_path / "wrong.ckpt")
    with pytest.raises(ValueError, match="shape mismatches") as e:
        tok.load_seed_voken(str(tmp_path / "wrong.ckpt"))
    assert "\n" not in str(e.value) and "encoder.conv_out.weight" in str(e.value)
    # a generator key we do not know (their optional 3x3 conv_shortcut) is refused, not silently dropped
    shapes = seed_voken_shapes(arch["filters"], tuple(arch["channel_multipliers"]), arch["num_res_blocks"], bits)
    extra = random_state(shapes, 0)
    extra["encoder.down.1.block.0.conv_shortcut.conv_1.weight"] = torch.zeros(64, 32, 3, 3, 3)
    torch.save(checkpoint(extra, None), tmp_path / "extra.ckpt")
    with pytest.raises(ValueError, match="1 unexpected") as e:
        tok.load_seed_voken(str(tmp_path / "extra.ckpt"))
    assert "\n" not in str(e.value)
    # our default (MAGVIT-v2) layout is refused before any file is read, naming the key
    with pytest.raises(ConfigError, match="arch.norm_per_frame"):
        VideoTokenizer.validate_config(tiny_args(arch={**arch, "norm_per_frame": None}, init_from=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="is not a file"):
        VideoTokenizer.validate_config(tiny_args(init_from=str(tmp_path / "missing.ckpt")))
    with pytest.raises(ConfigError, match="temporal_downsample"):
        VideoTokenizer(**tiny_args(arch={**arch, "temporal_downsample": [True, True]}, inference_only=True)
                       ).load_seed_voken(str(tmp_path / "extra.ckpt"))


def test_switches_default_to_the_magvit2_layout_and_each_changes_the_network():
    """The Open-MAGVIT2 switches are off by default; each one, flipped alone on the same weights, changes the output
    (so none is a no-op).  ``adaptive_norm: stats`` has other parameters; the parity test above pins it."""
    from vidgen.lightning_modules.nn.conv3d import ArchConfig, Decoder, Encoder

    base = dict(kind="magvit2", filters=8, channel_multipliers=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                norm_groups=4)
    d = ArchConfig(**base)
    assert d.layout.per_frame and not d.layout.symmetric and d.adaptive_norm == "resized" and d.mid_adaptive_norm
    assert d.depth_to_space == "pt c ph pw" and d.causal_upsample_keep == "last"
    x = torch.randn(1, 3, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    enc, dec = Encoder(d, 4), Decoder(d, 4)
    for name, p in dec.named_parameters():  # non-trivial AdaGN maps
        if "adanorm" in name:
            torch.nn.init.normal_(p, std=0.3)
    state = {**{f"e.{k}": v for k, v in enc.state_dict().items()}, **{f"d.{k}": v for k, v in dec.state_dict().items()}}

    def run(**sw):
        cfg = ArchConfig(**base, **sw)
        e, dd = Encoder(cfg, 4), Decoder(cfg, 4)
        e.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("e.")})
        dd.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("d.")},
                           strict=sw.get("mid_adaptive_norm", True))
        with torch.no_grad():
            return dd(torch.sign(e(x)))

    ref = run()
    assert torch.equal(ref, run())
    for sw in (dict(norm_per_frame=False), dict(downsample_padding="symmetric"), dict(mid_adaptive_norm=False),
               dict(depth_to_space="pt ph pw c"), dict(causal_upsample_keep="first")):
        out = run(**sw)
        assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-4), sw


def test_parity_with_their_code(tmp_path):
    """Their own Encoder/Decoder/LFQ/LitEma (not the restatement above), tiny random instances of the video layout,
    their ucf101 layout and the image one, raw and EMA weights: same latents, same tokens, same reconstructions.
    Runs when SEED_VOKEN_PATH names a SEED-Voken checkout (benchmarks/seed_voken_parity.py)."""
    spec = importlib.util.spec_from_file_location("seed_voken_parity", ROOT / "benchmarks" / "seed_voken_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    checkout = parity.find_checkout()
    if checkout is None:
        pytest.skip("no SEED-Voken checkout: set SEED_VOKEN_PATH to run the parity check against their code")
    results = parity.compare(checkout, tmp_path)
    assert len(results) == 10
    for case, r in results.items():
        assert r["tokens_equal"] and r["distinct_tokens"] > 1, (case, r)
        assert r["latents"] <= parity.TOLERANCE and r["recon"] <= parity.TOLERANCE, (case, r)
