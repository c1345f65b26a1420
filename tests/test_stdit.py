"""Open-Sora v1.2 STDiT3 (spec latte_tora.md §3, §5): parity with an independent re-statement of the official forward on
an official-layout state dict, block invariants (no mixing across frames / positions, RoPE only in time), x_mask/t0
frame conditioning, the mask generator, the §3.2 shift, and a tiny model overfitting a few clips."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vidgen.lightning_modules.nn.diffusion import RectifiedFlow
from vidgen.lightning_modules.stdit import (
    OPEN_SORA_MASK_RATIOS,
    STDIT3_MODELS,
    FrameMaskGenerator,
    STDiT,
    STDiT3,
    STDiT3Config,
    STDiTConfigError,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

TINY = dict(hidden_size=32, depth=2, num_heads=2, caption_channels=12, model_max_length=6)


def randomize(net: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random values for every parameter (zero-inits included), so no path is silently the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("norm.weight") else 0.0))
    return net


# ----------------------------------------------------------------------------------------------------------------------
# Parity: an official-layout state dict, and the official math re-stated independently (Open-Sora v1.2.0 stdit3.py,
# layers/blocks.py, rotary-embedding-torch): packed text tokens with block-diagonal attention, t_mask_select, ...
# ----------------------------------------------------------------------------------------------------------------------
def official_state_dict(d: int, depth: int, heads: int, cap: int, tokens: int, c: int = 4, seed: int = 0) -> dict:
    """Key names and shapes of ``hpcai-tech/OpenSora-STDiT-v3`` (spec §3.1 "Keys"), random values."""
    g = torch.Generator().manual_seed(seed)
    hd = d // heads
    shapes = {
        "x_embedder.proj.weight": (d, c, 1, 2, 2), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "fps_embedder.mlp.0.weight": (d, 256), "fps_embedder.mlp.0.bias": (d,),
        "fps_embedder.mlp.2.weight": (d, d), "fps_embedder.mlp.2.bias": (d,),
        "t_block.1.weight": (6 * d, d), "t_block.1.bias": (6 * d,),
        "y_embedder.y_proj.fc1.weight": (d, cap), "y_embedder.y_proj.fc1.bias": (d,),
        "y_embedder.y_proj.fc2.weight": (d, d), "y_embedder.y_proj.fc2.bias": (d,),
        "y_embedder.y_embedding": (tokens, cap),
        "final_layer.linear.weight": (4 * 2 * c, d), "final_layer.linear.bias": (4 * 2 * c,),
        "final_layer.scale_shift_table": (2, d),
    }
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(depth):
            p = f"{kind}.{i}."
            shapes.update({
                p + "scale_shift_table": (6, d),
                p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,),
                p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                p + "cross_attn.q_linear.weight": (d, d), p + "cross_attn.q_linear.bias": (d,),
                p + "cross_attn.kv_linear.weight": (2 * d, d), p + "cross_attn.kv_linear.bias": (2 * d,),
                p + "cross_attn.proj.weight": (d, d), p + "cross_attn.proj.bias": (d,),
                p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
                p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,),
            })
    sd = {k: torch.randn(s, generator=g, dtype=torch.float64) * (0.3 if len(s) > 1 else 0.1) for k, s in shapes.items()}
    for k in sd:
        if k.endswith("norm.weight"):
            sd[k] = 1.0 + 0.2 * sd[k]
    # rotary-embedding-torch RotaryEmbedding(dim=hd): freqs = 1 / 10000^(arange(0, hd, 2) / hd), a state-dict entry
    sd["rope.freqs"] = 1.0 / (10000 ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd))
    return sd


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _sinusoid(t, dim=256):  # GLIDE/DiT timestep_embedding, float32 then cast (as the official TimestepEmbedder)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()


def _rms(x, w):  # LlamaRMSNorm
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _rope(x, freqs):  # rotary-embedding-torch rotate_queries_or_keys, seq dim -2, interleaved pairs
    n = x.shape[-2]
    ang = torch.arange(n, dtype=freqs.dtype)[:, None] * freqs[None]
    ang = ang.repeat_interleave(2, dim=-1)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return x * ang.cos() + rot * ang.sin()


def reference_stdit3(sd, heads, x, timestep, y, mask, x_mask, fps, height, width, input_sq_size=512):
    """The official STDiT3.forward (v1.2.0) re-stated with plain tensor ops, float64."""
    d = sd["t_block.1.weight"].shape[1]
    hd = d // heads
    B, C, Tx, Hx, Wx = x.shape
    xp = F.pad(x, (0, (2 - Wx % 2) % 2, 0, (2 - Hx % 2) % 2))
    h = F.conv3d(xp, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=(1, 2, 2))
    T, H, W = h.shape[2:]
    S = H * W
    h = h.flatten(2).transpose(1, 2)  # [B, N, d]
    # PositionEmbedding2D(x, H, W, scale, base_size)
    base_size = round(S**0.5)
    scale = (float(height[0]) * float(width[0])) ** 0.5 / input_sq_size
    half = d // 2
    inv = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    gh = torch.arange(H) / scale * (base_size / H)
    gw = torch.arange(W) / scale * (base_size / W)
    a, b = torch.meshgrid(gw, gh, indexing="ij")
    a, b = a.t().reshape(-1), b.t().reshape(-1)

    def sc(v):
        out = torch.einsum("i,d->id", v.float(), inv)
        return torch.cat([out.sin(), out.cos()], -1)

    pos = torch.cat([sc(a), sc(b)], -1).double()
    h = (h.reshape(B, T, S, d) + pos).reshape(B, T * S, d)

    def embed(tt, name):
        return _lin(F.silu(_lin(_sinusoid(tt), sd, name + ".mlp.0")), sd, name + ".mlp.2")

    fps_e = embed(fps, "fps_embedder")
    t = embed(timestep, "t_embedder") + fps_e
    t_mlp = _lin(F.silu(t), sd, "t_block.1")
    t0 = embed(torch.zeros_like(timestep), "t_embedder") + fps_e
    t0_mlp = _lin(F.silu(t0), sd, "t_block.1")
    # CaptionEmbedder (eval: no dropout), then padded tokens removed: one packed sequence + lengths
    ye = _lin(_gelu_tanh(_lin(y[:, 0], sd, "y_embedder.y_proj.fc1")), sd, "y_embedder.y_proj.fc2")
    packed = ye[mask.bool()]
    lens = mask.sum(1).tolist()
    starts = [sum(lens[:i]) for i in range(B)]

    def tsel(xa, xb):
        if x_mask is None:
            return xa
        xa, xb = xa.reshape(B, T, S, d), xb.reshape(B, T, S, d)
        return torch.where(x_mask[:, :, None, None], xa, xb).reshape(B, T * S, d)

    def self_attn(xm, p, temporal):
        seq = xm.reshape(B, T, S, d)
        seq = seq.permute(0, 2, 1, 3).reshape(B * S, T, d) if temporal else seq.reshape(B * T, S, d)
        n = seq.shape[1]
        q, k, v = _lin(seq, sd, p + "attn.qkv").reshape(-1, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k = _rms(q, sd[p + "attn.q_norm.weight"]), _rms(k, sd[p + "attn.k_norm.weight"])
        if temporal:
            q, k = _rope(q, sd["rope.freqs"]), _rope(k, sd["rope.freqs"])
        att = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        out = _lin(att.transpose(1, 2).reshape(-1, n, d), sd, p + "attn.proj")
        if temporal:
            return out.reshape(B, S, T, d).permute(0, 2, 1, 3).reshape(B, T * S, d)
        return out.reshape(B, T * S, d)

    def cross_attn(xx, p):  # BlockDiagonalMask.from_seqlens([N] * B, y_lens)
        q = _lin(xx, sd, p + "cross_attn.q_linear").reshape(B, -1, heads, hd)
        k, v = _lin(packed, sd, p + "cross_attn.kv_linear").reshape(-1, 2, heads, hd).unbind(1)
        outs = []
        for i in range(B):
            ki, vi = k[starts[i]: starts[i] + lens[i]], v[starts[i]: starts[i] + lens[i]]
            w = torch.einsum("nhd,mhd->hnm", q[i] * hd**-0.5, ki).softmax(-1)
            outs.append(torch.einsum("hnm,mhd->nhd", w, vi).reshape(-1, d))
        return _lin(torch.stack(outs), sd, p + "cross_attn.proj")

    def block(xx, p, temporal):
        sst = sd[p + "scale_shift_table"]
        m = (sst[None] + t_mlp.reshape(B, 6, -1)).chunk(6, dim=1)
        m0 = (sst[None] + t0_mlp.reshape(B, 6, -1)).chunk(6, dim=1)
        n1 = F.layer_norm(xx, (d,), eps=1e-6)
        xm = tsel(n1 * (1 + m[1]) + m[0], n1 * (1 + m0[1]) + m0[0])
        xm = self_attn(xm, p, temporal)
        xx = xx + tsel(m[2] * xm, m0[2] * xm)
        xx = xx + cross_attn(xx, p)
        n2 = F.layer_norm(xx, (d,), eps=1e-6)
        xm = tsel(n2 * (1 + m[4]) + m[3], n2 * (1 + m0[4]) + m0[3])
        xm = _lin(_gelu_tanh(_lin(xm, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        return xx + tsel(m[5] * xm, m0[5] * xm)

    depth = len([k for k in sd if k.startswith("spatial_blocks.") and k.endswith("scale_shift_table")])
    for i in range(depth):
        h = block(h, f"spatial_blocks.{i}.", False)
        h = block(h, f"temporal_blocks.{i}.", True)
    sst = sd["final_layer.scale_shift_table"]
    shift, sc_ = (sst[None] + t[:, None]).chunk(2, dim=1)
    shift0, sc0 = (sst[None] + t0[:, None]).chunk(2, dim=1)
    nf = F.layer_norm(h, (d,), eps=1e-6)
    h = nf * (1 + sc_) + shift
    # official T2IFinalLayer: the t0 branch normalises the already t-modulated h again (LN -> mod_t -> LN -> mod_t0)
    h0 = F.layer_norm(h, (d,), eps=1e-6) * (1 + sc0) + shift0
    h = _lin(tsel(h, h0), sd, "final_layer.linear")
    out = rearrange(h, "B (N_t N_h N_w) (T_p H_p W_p C_out) -> B C_out (N_t T_p) (N_h H_p) (N_w W_p)",
                    N_t=T, N_h=H, N_w=W, T_p=1, H_p=2, W_p=2)
    return out[:, :, :Tx, :Hx, :Wx]


@pytest.mark.parametrize("with_x_mask", [False, True])
def test_parity_with_official_math_on_an_official_state_dict(with_x_mask):
    d, depth, heads, cap, tokens = 32, 2, 2, 12, 6
    sd = official_state_dict(d, depth, heads, cap, tokens)
    net = STDiT3(STDiT3Config(hidden_size=d, depth=depth, num_heads=heads, caption_channels=cap,
                              model_max_length=tokens)).double().eval()
    report = net.load_pretrained(sd)  # strict: every official key, no other key
    assert report.exact and len(report.loaded) == len(sd)
    g = torch.Generator().manual_seed(1)
    B = 2
    x = torch.randn(B, 4, 3, 5, 6, generator=g, dtype=torch.float64)  # odd height: padded, then cropped
    timestep = torch.tensor([37.5, 801.0], dtype=torch.float64)
    y = torch.randn(B, 1, tokens, cap, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 0]])  # different lengths, one gap
    fps = torch.tensor([24.0, 8.0], dtype=torch.float64)
    height, width = torch.tensor([40.0, 40.0]), torch.tensor([96.0, 96.0])  # pixels; scale rule != 1
    x_mask = torch.tensor([[False, True, True], [True, True, False]]) if with_x_mask else None
    want = reference_stdit3(sd, heads, x, timestep, y, mask, x_mask, fps, height, width)
    got = net(x, timestep, y, mask, x_mask=x_mask, fps=fps, height=height, width=width)
    assert got.shape == (B, 8, 3, 5, 6)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def _parity_script():
    """benchmarks/opensora_parity.py (a script, loaded by path): imports the official STDiT3 from a checkout."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "opensora_parity.py"
    spec = importlib.util.spec_from_file_location("opensora_parity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_with_the_official_open_sora_code(dtype):
    """The official v1.2 STDiT3 itself (not a re-statement), same random weights, same inputs, with and without text
    mask and x_mask. Runs when OPENSORA_PATH names a v1.2 checkout (or opensora is importable)."""
    parity = _parity_script()
    checkout = parity.find_checkout()
    if checkout is None:
        pytest.skip("no Open-Sora v1.2 checkout: set OPENSORA_PATH to run the official parity check")
    if parity.missing_requirements():
        pytest.skip(f"the official STDiT3 needs {parity.missing_requirements()} installed")
    results = parity.compare(checkout, dtypes=(dtype,))
    assert len(results) == len(parity.CASES)
    for (_, case), diff in results.items():
        assert isinstance(diff, float) and diff <= parity.TOLERANCE[dtype], f"{dtype} {case}: {diff}"


def test_strict_load_rejects_wrong_layouts():
    d, depth, heads, cap, tokens = 32, 2, 2, 12, 6
    net = STDiT3(STDiT3Config(hidden_size=d, depth=depth, num_heads=heads, caption_channels=cap, model_max_length=tokens))
    sd = official_state_dict(d, depth, heads, cap, tokens)
    assert set(sd) == set(net.state_dict())  # our names ARE the official names
    extra = {**sd, "pos_embed": torch.zeros(1, 4, d)}
    with pytest.raises(KeyError, match="pos_embed"):
        net.load_pretrained(extra)
    missing = {k: v for k, v in sd.items() if k != "temporal_blocks.1.attn.q_norm.weight"}
    with pytest.raises(KeyError, match="temporal_blocks.1.attn.q_norm.weight"):
        net.load_pretrained(missing)
    report = net.load_pretrained(missing, strict=False)
    assert [k for k, _ in report.missing] == ["temporal_blocks.1.attn.q_norm.weight"]


def test_official_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.float().contiguous() for k, v in official_state_dict(32, 2, 2, 12, 6).items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    net = STDiT3(STDiT3Config(**TINY))
    assert net.load_pretrained(path).exact
    torch.testing.assert_close(net.temporal_blocks[1].mlp.fc2.weight, sd["temporal_blocks.1.mlp.fc2.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------------------------------
def _block_inputs(net, T=4, S=6, B=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    d = net.config.hidden_size
    x = torch.randn(B, T * S, d, generator=g)
    y = torch.randn(B, 5, d, generator=g)
    t_mlp = torch.randn(B, 6 * d, generator=g)
    return x, y, t_mlp


def test_spatial_blocks_never_mix_frames_and_temporal_blocks_never_mix_positions():
    net = randomize(STDiT3(STDiT3Config(**TINY)))
    T, S = 4, 6
    x, y, t_mlp = _block_inputs(net, T, S)
    spatial, temporal = net.spatial_blocks[0], net.temporal_blocks[0]
    x2 = rearrange(x.clone(), "b (t s) d -> b t s d", t=T)
    x2[:, 1] += 5.0  # change frame 1 only
    x2 = rearrange(x2, "b t s d -> b (t s) d")
    out, out2 = (rearrange(spatial(v, y, t_mlp, T=T, S=S), "b (t s) d -> b t s d", t=T) for v in (x, x2))
    assert (out2[:, 1] - out[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(out2[:, [0, 2, 3]], out[:, [0, 2, 3]])
    x3 = rearrange(x.clone(), "b (t s) d -> b t s d", t=T)
    x3[:, :, 2] += 5.0  # change position 2 in every frame
    x3 = rearrange(x3, "b t s d -> b (t s) d")
    out, out3 = (rearrange(temporal(v, y, t_mlp, T=T, S=S, rope=net.rope), "b (t s) d -> b t s d", t=T) for v in (x, x3))
    assert (out3[:, :, 2] - out[:, :, 2]).abs().max() > 1e-3
    torch.testing.assert_close(out3[:, :, [0, 1, 3, 4, 5]], out[:, :, [0, 1, 3, 4, 5]])


def test_rope_only_in_temporal_attention():
    net = randomize(STDiT3(STDiT3Config(**TINY))).eval()
    calls = []
    net.rope.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    x = torch.randn(1, 4, 3, 4, 4)
    net(x, torch.tensor([500.0]), torch.randn(1, 6, 12))
    T = 3
    assert len(calls) == 2 * len(net.temporal_blocks)  # q and k of every temporal block, nothing else
    assert all(shape[-2] == T for shape in calls)  # rotated along the frame axis
    assert all(b.attn.rope is None for b in [*net.spatial_blocks, *net.temporal_blocks])  # no private RoPE
    # spatial attention has no position signal: permuting the tokens of a frame permutes its output
    x, y, t_mlp = _block_inputs(net, T=2, S=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    sp = net.spatial_blocks[0]
    px = rearrange(rearrange(x, "b (t s) d -> b t s d", t=2)[:, :, perm], "b t s d -> b (t s) d")
    out = rearrange(sp(x, y, t_mlp, T=2, S=6), "b (t s) d -> b t s d", t=2)[:, :, perm]
    torch.testing.assert_close(rearrange(sp(px, y, t_mlp, T=2, S=6), "b (t s) d -> b t s d", t=2), out)
    # temporal attention does see the frame order (RoPE): swapping two frames is not a plain permutation
    tb = net.temporal_blocks[0]
    x, y, t_mlp = _block_inputs(net, T=3, S=2)
    swap = torch.tensor([1, 0, 2])
    sx = rearrange(rearrange(x, "b (t s) d -> b t s d", t=3)[:, swap], "b t s d -> b (t s) d")
    a = rearrange(tb(sx, y, t_mlp, T=3, S=2, rope=net.rope), "b (t s) d -> b t s d", t=3)
    b = rearrange(tb(x, y, t_mlp, T=3, S=2, rope=net.rope), "b (t s) d -> b t s d", t=3)[:, swap]
    assert (a - b).abs().max() > 1e-4


def test_init_temporal_blocks_are_identity_and_fps_embedder_zero():
    net = STDiT3(STDiT3Config(**TINY))
    x, y, t_mlp = _block_inputs(net, T=3, S=4)
    for tb in net.temporal_blocks:
        torch.testing.assert_close(tb(x, y, t_mlp, T=3, S=4, rope=net.rope), x)
    assert net.fps_embedder.mlp[2].weight.abs().max() == 0 and net.fps_embedder.mlp[2].bias.abs().max() == 0
    assert net.spatial_blocks[0].attn.proj.weight.abs().max() > 0


def test_motion_fuser_hook_sees_the_modulated_input_before_self_attention():
    net = randomize(STDiT3(STDiT3Config(**TINY))).eval()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x_m, motion, T, S):
            seen.append((tuple(x_m.shape), T, S, float(motion)))
            return x_m

    for b in net.temporal_blocks:
        b.fuser = Probe()
    x, t, y = torch.randn(2, 4, 3, 4, 6), torch.tensor([3.0, 700.0]), torch.randn(2, 6, 12)
    base = net(x, t, y)
    out = net(x, t, y, motion=[torch.tensor(1.0), None])
    assert seen == [((2, 3 * 6, 32), 3, 6, 1.0)]  # only temporal block 0 got a motion entry
    torch.testing.assert_close(out, base)  # an identity fuser changes nothing
    net.temporal_blocks[0].fuser = type("Shift", (torch.nn.Module,), {"forward": lambda s, x_m, m, T, S: x_m + m})()
    assert (net(x, t, y, motion=[torch.tensor(1.0), None]) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="one entry"):
        net(x, t, y, motion=[None])


# ----------------------------------------------------------------------------------------------------------------------
# x_mask / t0 frame conditioning (§3.1)
# ----------------------------------------------------------------------------------------------------------------------
def test_x_mask_frames_use_t0_modulation():
    net = randomize(STDiT3(STDiT3Config(**TINY))).eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 6, 12, generator=g)
    t = torch.tensor([400.0, 900.0])
    none, all_true = net(x, t, y), net(x, t, y, x_mask=torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(all_true, none)
    # every frame given: the blocks run every frame at t = 0 ...
    seen = []
    hook = net.final_layer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    net(x, t, y, x_mask=torch.zeros(2, 3, dtype=torch.bool))
    net(x, torch.zeros(2), y)
    hook.remove()
    torch.testing.assert_close(seen[0][0], seen[1][0])
    # ... and the final layer (official v1.2 order) modulates with t, then normalises and modulates again with t0
    fl, d = net.final_layer, TINY["hidden_size"]
    with torch.no_grad():
        t_emb = net.t_embedder(t) + net.fps_embedder(torch.full((2,), 24.0))
        t0_emb = net.t_embedder(torch.zeros(2)) + net.fps_embedder(torch.full((2,), 24.0))
        shift, scale = (fl.scale_shift_table[None] + t_emb[:, None]).unbind(1)
        shift0, scale0 = (fl.scale_shift_table[None] + t0_emb[:, None]).unbind(1)
        h = F.layer_norm(seen[0][0], (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        h = F.layer_norm(h, (d,), eps=1e-6) * (1 + scale0[:, None]) + shift0[:, None]
    torch.testing.assert_close(seen[0][1], fl.linear(h))
    # per frame, in a block that does not mix frames: given frames get the t0 parameters, the others t
    sp = net.spatial_blocks[0]
    xb, yb, t_mlp = _block_inputs(net, T=3, S=4)
    t0_mlp = torch.randn_like(t_mlp)
    xm = torch.tensor([[False, True, True], [True, False, True]])
    mixed = rearrange(sp(xb, yb, t_mlp, x_mask=xm, t0_mlp=t0_mlp, T=3, S=4), "b (t s) d -> b t s d", t=3)
    with_t = rearrange(sp(xb, yb, t_mlp, T=3, S=4), "b (t s) d -> b t s d", t=3)
    with_t0 = rearrange(sp(xb, yb, t0_mlp, T=3, S=4), "b (t s) d -> b t s d", t=3)
    torch.testing.assert_close(mixed[xm], with_t[xm])
    torch.testing.assert_close(mixed[~xm], with_t0[~xm])


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    return STDiT(size="S/2", depth=2, hidden_size=64, num_heads=4, class_dropout_prob=0.0,
                 text_encoder={"kind": "minilm", "max_length": 12}, vae={"kind": "pixels", "factor": 4},
                 num_frames=4, resolution=16, sample_steps=4, cfg_scale=1.0, warmup_steps=0)


def _clips(n=2, T=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, size, size, generator=g) * 2 - 1
    drift = torch.linspace(0, 0.5, T).view(1, 1, T, 1, 1)
    return (base + drift).clamp(-1, 1)


def test_given_frames_are_clean_inputs_and_out_of_the_loss(tiny_lm):
    lm = tiny_lm
    batch = {"video": _clips(), "text": ["a red square moving left", "a blue circle moving up"], "fps": torch.tensor([8.0, 8.0])}
    seen = {}
    handle = lm.model.register_forward_hook(lambda m, args, kw, out: seen.update(x=args[0], out=out, kw=kw),
                                            with_kwargs=True)
    try:
        x_mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
        terms = lm.loss_terms(batch, generator=torch.Generator().manual_seed(0), x_mask=x_mask)
    finally:
        handle.remove()
    x0 = lm.latents(batch)
    given = rearrange(~x_mask, "b t -> b 1 t 1 1").expand_as(x0)
    torch.testing.assert_close(seen["x"][given], x0[given])  # given frames enter clean
    assert (seen["x"][~given] - x0[~given]).abs().min() > 0  # generated frames are noised
    assert torch.equal(seen["kw"]["x_mask"], x_mask)  # and the network is told (t0 modulation)
    # the loss is the velocity error over the generated frames only: recompute it from the same noise
    t = terms["t"]
    tau = (t / 1000).view(-1, 1, 1, 1, 1)
    noise = (seen["x"] - (1 - tau) * x0) / tau  # valid on generated frames
    err = (seen["out"][:, :3] - (x0 - noise)) ** 2
    gen = ~given
    want = torch.stack([err[i][gen[i]].mean() for i in range(2)])
    torch.testing.assert_close(terms["loss"], want, rtol=1e-4, atol=1e-5)


def test_mask_generator_stage_probabilities_and_types():
    gen = FrameMaskGenerator("stage1")
    assert gen.mask_ratios["identity"] == pytest.approx(0.8)  # stage 1 masks 20% of the samples
    names = gen.mask_types(20000, torch.Generator().manual_seed(0))
    assert names.count("image_head") / 20000 == pytest.approx(0.05, abs=0.006)
    assert names.count("identity") / 20000 == pytest.approx(0.8, abs=0.01)
    assert FrameMaskGenerator("stage3").mask_ratios["image_head"] == 0.22
    g = torch.Generator().manual_seed(0)
    fm = FrameMaskGenerator.frame_mask
    assert fm("image_head", 5, g).tolist() == [False, True, True, True, True]
    assert fm("image_tail", 5, g).tolist() == [True, True, True, True, False]
    assert fm("image_head_tail", 5, g).tolist() == [False, True, True, True, False]
    assert fm("identity", 5, g).all() and fm("image_head", 1, g).all()
    m = fm("interpolate", 6, g)
    assert m.tolist() in ([False, True] * 3, [True, False] * 3)
    for _ in range(20):
        q = fm("quarter_head", 12, g)
        k = int((~q).sum())
        assert 1 <= k <= 3 and not q[:k].any() and q[k:].all()
        assert fm("random", 6, g).any()
    with pytest.raises(STDiTConfigError, match="unknown mask types"):
        FrameMaskGenerator({"image_middle": 0.1})
    with pytest.raises(STDiTConfigError, match="sum to 1"):
        FrameMaskGenerator({"random": 0.7, "image_head": 0.6})
    assert FrameMaskGenerator({"intepolate": 0.5}).mask_ratios["interpolate"] == 0.5  # the official spelling


# ----------------------------------------------------------------------------------------------------------------------
# Rectified flow as STDiT uses it (§3.2; the process itself is pinned in test_diffusion.py)
# ----------------------------------------------------------------------------------------------------------------------
def test_timestep_shift_follows_the_pixel_size_and_length(tiny_lm):
    lm = tiny_lm
    kw = {"height": torch.tensor([16.0]), "width": torch.tensor([16.0])}
    lm.vae.temporal_factor = 4  # as a causal 4x VAE: 5 latent frames <- 17 frames, T' = 17 // 17 * 5
    try:
        assert lm.pixel_frames(5) == 17 and lm.pixel_frames(15) == 57
        torch.testing.assert_close(lm.timestep_shift(kw, 5), torch.tensor([math.sqrt(16 * 16 / 512**2) * math.sqrt(5)]))
        # 13 latent frames <- 49 frames: Open-Sora's T' = 49 // 17 * 5 = 10
        torch.testing.assert_close(lm.timestep_shift(kw, 13), torch.tensor([math.sqrt(16 * 16 / 512**2) * math.sqrt(10)]))
    finally:
        lm.vae.temporal_factor = 1
    # the pixel stand-in keeps 4 frames: shorter than Open-Sora's 17, so T' = the 4 latent frames
    torch.testing.assert_close(lm.timestep_shift(kw, 4), torch.tensor([math.sqrt(16 * 16 / 512**2) * 2.0]))
    lm.hparams.use_timestep_transform = False
    try:
        assert lm.timestep_shift(kw, 4) == 1.0
    finally:
        lm.hparams.use_timestep_transform = True


def test_euler_with_true_velocity_keeps_given_frames_and_recovers_x0():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 3, 2, 2, generator=g)
    known_mask = torch.tensor([[False, True, True], [True, True, False]]).view(2, 1, 3, 1, 1)
    seen = []

    def oracle(x, t):
        seen.append(x.clone())
        tau = (t.double() / 1000).view(-1, 1, 1, 1, 1)
        return ((x0.double() - x.double()) / tau).float()  # x0 - eps on the straight path through x

    out = RectifiedFlow(sample_steps=6).sample(oracle, x0.shape, shift=2.0, generator=g, known=x0, known_mask=known_mask)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    m = known_mask.expand_as(x0)
    assert all(torch.equal(s[~m], x0[~m]) for s in seen)  # the given frames are clean at every step


# ----------------------------------------------------------------------------------------------------------------------
# LightningModule
# ----------------------------------------------------------------------------------------------------------------------
def test_tiny_stdit_overfits_a_few_clips(tiny_lm):
    """Memorise 2 captioned clips under a fixed set of (t, noise): the velocity MSE drops >= 5x."""
    lm = tiny_lm
    torch.manual_seed(0)
    batch = {"video": _clips(2), "text": ["a red square moving left", "a blue circle moving up"],
             "fps": torch.tensor([8.0, 8.0])}
    x0 = lm.latents(batch)
    kw = lm.model_kwargs(batch, x0)
    reps = 4
    x0 = x0.repeat(reps, 1, 1, 1, 1)
    kw = {k: v.repeat(reps, *([1] * (v.ndim - 1))) for k, v in kw.items()}
    g = torch.Generator().manual_seed(0)
    t = lm.diffusion.sample_timesteps(x0.shape[0], g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=2e-3, eps=1e-15)

    def loss():
        return lm.diffusion.training_losses(lm.model, x0, kw, t=t, noise=noise)["loss"].mean()

    lm.model.eval()
    with torch.no_grad():
        before = float(loss())
    lm.model.train()
    for _ in range(150):
        opt.zero_grad()
        loss().backward()
        opt.step()
    lm.model.eval()
    with torch.no_grad():
        after = float(loss())
    assert after < before / 5, (before, after)


def test_generate_and_predict_contract(tiny_lm):
    lm = tiny_lm
    g = torch.Generator().manual_seed(0)
    out = lm.predict_step({"text": ["a red square moving left"], "key": ["k0"]}, 0)
    assert out["videos"].shape == (1, 3, 4, 16, 16) and out["keys"] == ["k0"]
    assert out["captions"] == ["a red square moving left"]
    assert out["videos"].abs().max() <= 1
    v = lm.generate({"text": ["x", "y"]}, generator=g)
    assert v.shape == (2, 3, 4, 16, 16)


def test_cfg_uses_the_null_caption_under_the_prompt_mask(tiny_lm):
    lm = tiny_lm
    calls = []
    handle = lm.model.register_forward_hook(lambda m, args, kw, out: calls.append(kw), with_kwargs=True)
    lm.hparams.cfg_scale = 7.0
    try:
        lm.generate({"text": ["a red square moving left"]}, generator=torch.Generator().manual_seed(0))
    finally:
        lm.hparams.cfg_scale = 1.0
        handle.remove()
    kw = calls[0]
    y, mask = kw["y"], kw["mask"]
    assert y.shape[0] == 2  # [cond; null] in one batch
    torch.testing.assert_close(y[1], lm.model.y_embedder.y_embedding)
    assert torch.equal(mask[0], mask[1]) and not mask[0].all()  # the null uses the prompt's mask (padding kept out)


def test_config_errors_name_the_key():
    for bad, match in [
        (dict(size="XXL/2"), "size"),
        (dict(mask_ratios={"image_middle": 0.1}), "mask types"),
        (dict(num_frames=0), "num_frames"),
        (dict(size="S/2", hidden_size=30, num_heads=4), "hidden_size"),
        (dict(init_from="/nonexistent/model.safetensors", text_encoder={"kind": "minilm"},
              vae={"kind": "pixels"}), "init_from"),
        (dict(text_encoder={"kind": "hf"}), "path"),
    ]:
        with pytest.raises(STDiTConfigError, match=match):
            STDiT.validate_config(bad)
    assert set(STDIT3_MODELS) >= {"S/2", "XL/2"} and OPEN_SORA_MASK_RATIOS["stage1"]["image_head"] == 0.05


def test_causal_vae_micro_chunks_17_frames_to_5_latents(tmp_path):
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer, latent_autoencoder

    tok = VideoTokenizer(arch={"kind": "magvit2", "filters": 4, "channel_multipliers": [1, 1, 1],
                               "temporal_downsample": [True, True], "num_res_blocks": 1, "norm_groups": 2,
                               "zero_centered": True},
                         bottleneck={"kind": "kl", "dim": 4}, discriminator={"enabled": False},
                         loss={"perceptual_weight": 0}, num_frames=17, resolution=8)
    path = tmp_path / "vae.ckpt"
    torch.save({"hyper_parameters": dict(tok.hparams), "state_dict": tok.state_dict()}, path)
    with pytest.warns(UserWarning, match="no EMA"):
        vae = latent_autoencoder({"kind": "tokenizer", "path": str(path), "micro_frame_size": 17, "sample": False})
    assert vae.latent_shape(17, 8, 8)[1] == 5 and vae.latent_shape(34, 8, 8)[1] == 10  # 17 -> 5, 34 -> 2 x 5
    assert vae.video_frames(5) == 17 and vae.video_frames(10) == 34
    video = torch.rand(1, 3, 34, 8, 8) * 2 - 1
    z = vae.encode(video)
    with torch.no_grad():  # each 17-frame chunk is coded on its own
        torch.testing.assert_close(z[:, :, 5:], tok.encode(video[:, :, 17:], sample=False))
    assert vae.decode(z).shape == video.shape


def test_recipes_validate_before_any_work():
    from pathlib import Path

    import yaml

    from vidgen.datamodules.buckets import BucketConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "stdit"
    tiny = yaml.safe_load((root / "t2v_tiny.yaml").read_text())
    STDiT.validate_config(tiny["model"]["init_args"])
    full = yaml.safe_load((root / "t2v.yaml").read_text())
    with pytest.raises(STDiTConfigError, match="pretrained/t5-v1_1-xxl|runs/vae/"):  # local files, named
        STDiT.validate_config(full["model"]["init_args"])
    buckets = BucketConfig(full["data"]["init_args"]["bucket_config"])
    b = buckets.assign(60, 144, 256, seed=(0,))  # only 144p is small enough; 60 frames > 51 kept with p = 1
    assert (b.resolution, b.frames, b.batch_size) == ("144p", 51, 51)
