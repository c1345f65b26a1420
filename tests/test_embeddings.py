"""Timestep features, sin-cos tables (official DiT/MAE channel order) and RoPE, pinned by hand values."""

import math

import numpy as np
import pytest
import torch

from vidgen.lightning_modules.nn.embeddings import (
    RotaryEmbedding,
    TimestepEmbedder,
    apply_rotary,
    sincos_1d,
    sincos_2d,
    sincos_3d,
    timestep_embedding,
)


def test_timestep_embedding_is_cos_then_sin():
    # dim 4: half = 2, f = [1, exp(-ln(1e4) / 2)] = [1, 0.01]
    t = torch.tensor([0.0, 1.0, 100.0])
    got = timestep_embedding(t, 4).double()
    want = torch.tensor(
        [[math.cos(s), math.cos(0.01 * s), math.sin(s), math.sin(0.01 * s)] for s in (0.0, 1.0, 100.0)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_timestep_embedding_256_frequencies_and_odd_dim():
    t = torch.tensor([3.0])
    emb = timestep_embedding(t, 256)
    k = np.arange(128)
    f = np.exp(-math.log(10000) * k / 128)  # spec 1.5: f_k = exp(-ln 1e4 * k / 128)
    np.testing.assert_allclose(emb[0, :128].numpy(), np.cos(3 * f), atol=1e-5)
    np.testing.assert_allclose(emb[0, 128:].numpy(), np.sin(3 * f), atol=1e-5)
    odd = timestep_embedding(t, 5)
    assert odd.shape == (1, 5) and odd[0, -1] == 0


def test_timestep_embedder_layout():
    emb = TimestepEmbedder(32)
    keys = {k: tuple(v.shape) for k, v in emb.state_dict().items()}
    assert keys == {"mlp.0.weight": (32, 256), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32), "mlp.2.bias": (32,)}
    assert emb(torch.tensor([0, 999])).shape == (2, 32)


def test_sincos_1d_hand_values():
    # dim 4: omega = 10000^-(k/2) = [1, 0.01]; layout [sin, sin, cos, cos]
    got = sincos_1d(4, 3).double()
    want = torch.tensor([[math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)] for p in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sincos_1d(4, [0.5]).double()[0], torch.tensor(
        [math.sin(0.5), math.sin(0.005), math.cos(0.5), math.cos(0.005)], dtype=torch.float64), atol=1e-6, rtol=0)


def test_sincos_2d_first_half_is_w_coordinate():
    # grid (h=2, w=3), dim 8: token n = i*3 + j; channels [:4] encode column j, [4:] encode row i
    table = sincos_2d(8, (2, 3)).double()
    assert table.shape == (6, 8)
    one_d = sincos_1d(4, 3).double()
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(table[i * 3 + j, :4], one_d[j])
            torch.testing.assert_close(table[i * 3 + j, 4:], one_d[i])
    # token (i=0, j=1): w-part sin(1)..., h-part at position 0 = [0, 0, 1, 1]
    torch.testing.assert_close(
        table[1], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1], dtype=torch.float64),
        atol=1e-6, rtol=0,
    )


def _mae_numpy(embed_dim, grid_size):
    """The official MAE/DiT recipe, transcribed with numpy (meshgrid(grid_w, grid_h): w goes first)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), axis=0)
    grid = grid.reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_2d_matches_official_recipe():
    np.testing.assert_allclose(sincos_2d(16, 4).numpy(), _mae_numpy(16, 4).astype(np.float32), atol=1e-7)


def test_sincos_2d_opensora_scale_base_size():
    # coordinates arange(n) / scale * (base_size / n): rows i/2*(4/2) = i, columns j/2*(4/4) = j/2
    table = sincos_2d(8, (2, 4), scale=2.0, base_size=4).double()
    one_d_w = sincos_1d(4, [j / 2 for j in range(4)]).double()
    one_d_h = sincos_1d(4, [0.0, 1.0]).double()
    for i in range(2):
        for j in range(4):
            torch.testing.assert_close(table[i * 4 + j], torch.cat([one_d_w[j], one_d_h[i]]))


def test_sincos_3d_layout():
    table = sincos_3d(16, (2, 2, 3), temporal_dim=4)
    assert table.shape == (12, 16)
    torch.testing.assert_close(table[7, :4], sincos_1d(4, 2)[1])  # token 7 = (t=1, h=0, w=1)
    torch.testing.assert_close(table[7, 4:], sincos_2d(12, (2, 3))[1])
    with pytest.raises(ValueError, match="temporal_dim"):
        sincos_3d(16, (2, 2, 2), temporal_dim=3)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_preserves_norm_and_is_relative(interleaved):
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, interleaved=interleaved)
    q, k = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    rq = rope(q[None].float(), torch.tensor([3, 10])).double()[0]
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)

    def dot(pq, pk):
        a = rope(q[:1].float(), torch.tensor([pq]))
        b = rope(k[:1].float(), torch.tensor([pk]))
        return (a * b).sum().item()

    assert dot(3, 1) == pytest.approx(dot(10, 8), abs=1e-4)
    assert dot(0, 0) == pytest.approx((q[0] * k[0]).sum().item(), abs=1e-5)
    assert abs(dot(3, 1) - dot(3, 2)) > 1e-3  # it does depend on the offset


def test_rope_hand_values_and_partial():
    # interleaved pairs are complex numbers multiplied by exp(i p f_k), f_k = 10000^(-2k/dim)
    rope = RotaryEmbedding(4)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    p = 2.0
    out = rope(x, torch.tensor([p]))[0].double()
    want = torch.tensor([math.cos(p), math.sin(p), math.cos(p / 100), math.sin(p / 100)], dtype=torch.float64)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    # partial rotary: a 4-dim rope on an 6-dim head leaves the last two channels untouched
    y = torch.randn(3, 6)
    out = rope(y)
    torch.testing.assert_close(out[:, 4:], y[:, 4:])
    cos, sin = rope.cos_sin(torch.arange(3))
    torch.testing.assert_close(out, apply_rotary(y, cos, sin))
    assert dict(rope.state_dict()) == {}  # RoPE adds no checkpoint keys


def test_rope_offset_and_per_sample_positions():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(rope(x, offset=4), rope(x, torch.arange(4, 9)))
    pos = torch.stack([torch.arange(5), torch.arange(2, 7)])
    out = rope(x, pos)
    torch.testing.assert_close(out[1], rope(x[1:], torch.arange(2, 7))[0])
