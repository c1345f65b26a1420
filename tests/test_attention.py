"""attention(): equals softmax(QK^T/sqrt d)V on every backend; causality, KV-cache decoding, padding masks."""

import pytest
import torch
from einops import rearrange

from vidgen.lightning_modules.nn import attention as attn_mod
from vidgen.lightning_modules.nn.attention import (
    CrossAttention,
    KVCache,
    Mlp,
    MultiHeadAttention,
    attention,
    attention_backend,
    causal_mask,
    get_attention_backend,
    prefix_lm_mask,
    resolve_backend,
    set_attention_backend,
)
from vidgen.lightning_modules.nn.embeddings import RotaryEmbedding

BACKENDS = ["sdpa", "math", "auto"]


def naive(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v in float64; mask bool (True = attend) or additive."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return torch.softmax(logits, dim=-1) @ v


def qkv(b=2, h=3, nq=5, nk=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g), torch.randn(b, h, nk, d, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_naive_reference(backend):
    q, k, v = qkv(nq=5, nk=7)
    torch.testing.assert_close(attention(q, k, v, backend=backend).double(), naive(q, k, v), atol=1e-5, rtol=1e-5)
    bool_mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    bool_mask[..., 0] = True  # no fully masked rows
    torch.testing.assert_close(attention(q, k, v, bool_mask, backend=backend).double(), naive(q, k, v, bool_mask), atol=1e-5, rtol=1e-5)
    float_mask = torch.randn(1, 3, 5, 7)
    torch.testing.assert_close(attention(q, k, v, float_mask, backend=backend).double(), naive(q, k, v, float_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_matches_reference_and_is_bottom_right_aligned(backend):
    q, k, v = qkv(nq=6, nk=6)
    tri = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attention(q, k, v, causal=True, backend=backend).double(), naive(q, k, v, tri), atol=1e-5, rtol=1e-5)
    # 2 new queries after 4 cached keys: query i sees keys j <= i + 4
    q2, k2, v2 = qkv(nq=2, nk=6)
    m = causal_mask(2, 6)
    assert m.tolist() == [[True] * 5 + [False], [True] * 6]
    torch.testing.assert_close(attention(q2, k2, v2, causal=True, backend=backend).double(), naive(q2, k2, v2, m), atol=1e-5, rtol=1e-5)
    # causal combined with a padding mask
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[0, ..., 1] = False
    torch.testing.assert_close(
        attention(q, k, v, pad, causal=True, backend=backend).double(), naive(q, k, v, pad & tri), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_output_ignores_the_future(backend):
    q, k, v = qkv(nq=8, nk=8)
    out = attention(q, k, v, causal=True, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[..., 5:, :] += 10 * torch.randn_like(k2[..., 5:, :])
    v2[..., 5:, :] += 10 * torch.randn_like(v2[..., 5:, :])
    out2 = attention(q, k2, v2, causal=True, backend=backend)
    torch.testing.assert_close(out2[..., :5, :], out[..., :5, :])
    assert not torch.allclose(out2[..., 5:, :], out[..., 5:, :])


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_fully_masked_rows_give_zeros(backend):
    q, k, v = qkv(nq=2, nk=3)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = attention(q, k, v, mask, backend=backend)
    assert torch.isfinite(out).all() and (out[..., 1, :] == 0).all()


def test_backend_setting_and_resolution():
    previous = get_attention_backend()
    q, k, v = qkv()
    assert resolve_backend(q, k, v, backend="auto") == "sdpa"  # CPU tensors never go to xformers
    with attention_backend("math"):
        assert get_attention_backend() == "math" and resolve_backend(q, k, v) == "math"
    assert get_attention_backend() == previous
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("flash9")
    if not attn_mod.xformers_available():
        with pytest.raises(RuntimeError, match="xformers is not installed"):
            set_attention_backend("xformers")
        with pytest.raises(RuntimeError, match="xformers"):
            attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match=r"\[B, heads, N, d\]"):
        attention(q[0], k[0], v[0])


def test_prefix_lm_mask():
    m = prefix_lm_mask(2, 4)
    assert m.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    per_sample = prefix_lm_mask(torch.tensor([0, 3]), 4)
    assert per_sample.shape == (2, 1, 4, 4)
    assert torch.equal(per_sample[0, 0], causal_mask(4))
    assert torch.equal(per_sample[1, 0], prefix_lm_mask(3, 4))


def test_mha_matches_timm_layout_by_hand():
    torch.manual_seed(0)
    dim, heads = 16, 4
    mha = MultiHeadAttention(dim, heads, qkv_bias=True)
    assert {k: tuple(p.shape) for k, p in mha.state_dict().items()} == {
        "qkv.weight": (48, 16), "qkv.bias": (48,), "proj.weight": (16, 16), "proj.bias": (16,)
    }
    x = torch.randn(2, 5, dim)
    qkv_ = x @ mha.qkv.weight.T + mha.qkv.bias
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in qkv_.split(dim, dim=-1))
    ref = rearrange(naive(q, k, v).float(), "b h n d -> b n (h d)") @ mha.proj.weight.T + mha.proj.bias
    torch.testing.assert_close(mha(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preallocate", [False, True])
def test_kv_cache_decoding_equals_full_causal_forward(preallocate):
    torch.manual_seed(0)
    dim, heads, n = 32, 4, 9
    rope = RotaryEmbedding(dim // heads)
    mha = MultiHeadAttention(dim, heads, qk_norm=True, rope=rope, causal=True).eval()
    x = torch.randn(2, n, dim)
    full = mha(x)
    cache = KVCache.allocate(2, heads, n, dim // heads) if preallocate else KVCache()
    outs = []
    # a 3-token prompt, then one token at a time
    out, cache = mha(x[:, :3], kv_cache=cache)
    outs.append(out)
    for i in range(3, n):
        out, cache = mha(x[:, i : i + 1], kv_cache=cache)
        outs.append(out)
    assert cache.length == n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_ignores_padded_context():
    torch.manual_seed(0)
    ca = CrossAttention(16, context_dim=12, heads=2).eval()
    assert set(ca.state_dict()) == {
        "q_linear.weight", "q_linear.bias", "kv_linear.weight", "kv_linear.bias", "proj.weight", "proj.bias"
    }
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 12)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = ca(x, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[0, 4:] = 100 * torch.randn(2, 12)  # change only the padding of sample 0
    torch.testing.assert_close(ca(x, ctx2, mask), out)
    # equals attending to the truncated context
    torch.testing.assert_close(ca(x[:1], ctx[:1, :4]), out[:1], atol=1e-5, rtol=1e-5)
    # a cache reuses the context keys/values
    cache = KVCache()
    first, cache = ca(x, ctx, mask, kv_cache=cache)
    again, _ = ca(x, None, mask, kv_cache=cache)
    torch.testing.assert_close(again, first)
    with pytest.raises(ValueError, match="context_mask"):
        ca(x, ctx, mask[:, :3])


def test_mlp_layouts():
    mlp = Mlp(8, 32)
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    x = torch.randn(3, 8)
    ref = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
    torch.testing.assert_close(mlp(x), ref)
    glu = Mlp(8, 16, act="silu", gated=True)
    a, b = glu.fc1(x).chunk(2, dim=-1)
    torch.testing.assert_close(glu(x), glu.fc2(torch.nn.functional.silu(a) * b))
    with pytest.raises(ValueError, match="act"):
        Mlp(8, act="swish9")


def test_xformers_glue_with_a_stand_in(monkeypatch):
    """The xformers path ([B, N, H, d] layout, causal bias choice, fallback) against a stand-in module."""
    import types

    class LowerTriangularMask:
        pass

    class LowerTriangularFromBottomRightMask:
        pass

    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert q.shape[2] == 3  # heads on dim 2
        calls.append(type(attn_bias).__name__)
        qh, kh, vh = (rearrange(t, "b n h d -> b h n d") for t in (q, k, v))
        mask = None
        if isinstance(attn_bias, (LowerTriangularMask, LowerTriangularFromBottomRightMask)):
            mask = causal_mask(qh.shape[-2], kh.shape[-2])
            if isinstance(attn_bias, LowerTriangularMask) and qh.shape[-2] != kh.shape[-2]:
                raise AssertionError("top-left mask used for a rectangular causal call")
        if q.shape[1] == 4:
            raise NotImplementedError("no operator\nfor this")
        return rearrange(naive(qh, kh, vh, mask).float(), "b h n d -> b n h d")

    fake = types.SimpleNamespace(
        LowerTriangularMask=LowerTriangularMask,
        memory_efficient_attention=memory_efficient_attention,
        fmha=types.SimpleNamespace(attn_bias=types.SimpleNamespace(LowerTriangularFromBottomRightMask=LowerTriangularFromBottomRightMask)),
    )
    monkeypatch.setattr(attn_mod, "_xformers_ops", lambda: fake)
    monkeypatch.setattr(attn_mod, "_xformers_supported", lambda q, k, v, mask, causal: mask is None)
    q, k, v = qkv(nq=5, nk=7)
    assert resolve_backend(q, k, v, backend="auto") == "xformers"
    torch.testing.assert_close(attention(q, k, v, backend="auto").double(), naive(q, k, v), atol=1e-5, rtol=1e-5)
    out = attention(q, k, v, causal=True, backend="xformers").double()
    torch.testing.assert_close(out, naive(q, k, v, causal_mask(5, 7)), atol=1e-5, rtol=1e-5)
    q2, k2, v2 = qkv(nq=6, nk=6)
    attention(q2, k2, v2, causal=True, backend="auto")
    assert calls == ["NoneType", "LowerTriangularFromBottomRightMask", "LowerTriangularMask"]
    q3, k3, v3 = qkv(nq=4, nk=4)  # the stand-in refuses N=4: falls back to SDPA
    torch.testing.assert_close(attention(q3, k3, v3, backend="auto").double(), naive(q3, k3, v3), atol=1e-5, rtol=1e-5)
    # a dense mask is not sent to xformers
    assert resolve_backend(q, k, v, torch.ones(5, 7, dtype=torch.bool), backend="auto") == "sdpa"
