"""Math of the tokenizer parts (spec magvit.md §1.4–1.7, §1.11, §5.1–5.2): inflation, causality, frame counts,
LFQ / VQ, LeCam, R1, pooling, perceptual switch, config errors.  Tiny shapes, CPU."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from vidgen.lightning_modules.nn.conv3d import ArchConfig, ConfigError, Decoder, Encoder, avg_pool_same, causal_param_names
from vidgen.lightning_modules.nn.discriminator import BlurPool3d, StyleGANDiscriminator
from vidgen.lightning_modules.nn.gan_losses import LeCamEMA, discriminator_loss, generator_loss, r1_penalty
from vidgen.lightning_modules.nn.inflation import inflate_kernel, inflate_state_dict
from vidgen.lightning_modules.nn.perceptual import PerceptualLoss
from vidgen.lightning_modules.nn.quantizers import (BitBalance, CodebookUsage, LookupFreeQuantizer, VectorQuantizer,
                                             entropy_terms)
from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

TINY = dict(filters=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=4)


def _pair(kind, padding, td, latent=6):
    """(2D per-frame model, 3D model) encoder+decoder of one layout."""
    torch.manual_seed(0)
    a2 = ArchConfig(kind=kind, dims=2, padding=padding, temporal_downsample=td, **TINY)
    a3 = ArchConfig(kind=kind, dims=3, padding=padding, temporal_downsample=td, **TINY)
    m2 = torch.nn.ModuleDict({"enc": Encoder(a2, latent), "dec": Decoder(a2, latent)})
    m3 = torch.nn.ModuleDict({"enc": Encoder(a3, latent), "dec": Decoder(a3, latent)})
    return m2, m3


def _constant_video(T, H=16, b=2, c=3):
    torch.manual_seed(1)
    return torch.randn(b, c, 1, H, H).expand(b, c, T, H, H).contiguous()


@pytest.mark.parametrize("kind,td,T", [("magvit", (True, False), 4), ("magvit2", (False, True), 5)])
@pytest.mark.parametrize("padding", ["reflect", "zeros"])
@pytest.mark.parametrize("mode", ["central", "average"])
def test_inflation_matches_2d_on_constant_video(kind, td, T, padding, mode):
    """Inflated 3D enc/dec on a temporally constant video equal the 2D per-frame model, frame by frame.

    Exact condition: central inflation (slice k_t//2, or the last slice for causal kernels) puts weight only on the
    current frame, so the result equals the 2D model at EVERY frame for any padding.  Average inflation (kernel/k_t
    in every slice) sums k_t copies of the same frame, which is exact wherever the temporal window sees only real or
    replicated frames: at every frame with reflect/replicate padding (and causal padding, which replicates frame 0),
    but with zero padding only at frames farther than the temporal receptive field from the clip ends — the boundary
    frames then differ (checked below).  Joint (T,H,W) GroupNorm equals per-frame GroupNorm on constant input."""
    m2, m3 = _pair(kind, padding, td)
    causal = causal_param_names(m3)
    state, report = inflate_state_dict(m2.state_dict(), m3.state_dict(), mode, causal)
    assert not report["kept"] and not report["unused"]
    m3.load_state_dict(state)
    x = _constant_video(T)
    with torch.no_grad():
        z2, z3 = m2["enc"](x[:, :, :1]), m3["enc"](x)
        y2, y3 = m2["dec"](z2), m3["dec"](z3[:, :, :1].expand_as(z3).contiguous())
    assert z3.shape[2] == (T // 2 if kind == "magvit" else 1 + (T - 1) // 2)
    assert y3.shape[2] == T
    expect_exact = mode == "central" or padding != "zeros"
    if expect_exact:
        torch.testing.assert_close(z3, z2.expand_as(z3), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(y3, y2.expand_as(y3), atol=2e-5, rtol=1e-4)
    else:
        assert not torch.allclose(z3[:, :, 0], z2[:, :, 0], atol=1e-3)


@pytest.mark.parametrize("blur", [False, True])
def test_discriminator_inflation_matches_per_frame(blur):
    """Central-inflated 3D discriminator on a constant clip = the per-frame 2D discriminator (T collapses to 1)."""
    torch.manual_seed(0)
    d2 = StyleGANDiscriminator(3, 8, (2, 2, 2), num_frames=4, resolution=16, dims=2, blur=blur)
    d3 = StyleGANDiscriminator(3, 8, (2, 2, 2), num_frames=4, resolution=16, dims=3, blur=blur)
    state, report = inflate_state_dict(d2.state_dict(), d3.state_dict(), "central")
    assert report["inflated"] and not report["kept"]
    d3.load_state_dict(state)
    x = _constant_video(4)
    with torch.no_grad():
        l2, l3 = d2(x), d3(x)
    assert l2.shape == (2 * 4,) and l3.shape == (2,)
    torch.testing.assert_close(l3, l2.view(2, 4)[:, 0], atol=1e-5, rtol=1e-4)


def test_inflate_kernel_modes_and_tiling():
    w2 = torch.randn(4, 3, 3, 3)
    c = inflate_kernel(w2, 3, "central")
    assert torch.equal(c[:, :, 1], w2) and not c[:, :, [0, 2]].any()
    last = inflate_kernel(w2, 3, "central", causal=True)
    assert torch.equal(last[:, :, 2], w2) and not last[:, :, :2].any()
    torch.testing.assert_close(inflate_kernel(w2, 3, "average").sum(2), w2)
    # depth-to-space upsampler: 2D emits (c ph pw), 3D emits (pt c ph pw) -> tile over pt
    out, rep = inflate_state_dict({"w": w2[:, :, None], "b": torch.arange(4.0)},
                                  {"w": torch.zeros(8, 3, 3, 3, 3), "b": torch.zeros(8)})
    assert rep["tiled"] == ["w", "b"]
    assert torch.equal(out["w"][4:, :, 1], w2) and torch.equal(out["b"], torch.arange(4.0).repeat(2))
    with pytest.raises(ValueError, match="same layout"):
        inflate_state_dict({"w": torch.zeros(4, 3, 5, 5)}, {"w": torch.zeros(4, 3, 3, 3, 3)})


def test_causality_encoder_and_decoder():
    """Changing frames > 4j leaves latent frames ≤ j unchanged; changing latent j leaves output frames < 4j−3 unchanged."""
    torch.manual_seed(0)
    arch = ArchConfig(kind="magvit2", temporal_downsample=(True, True), **TINY)
    enc, dec = Encoder(arch, 6), Decoder(arch, 6)
    x = torch.randn(1, 3, 9, 16, 16)
    x2 = x.clone()
    x2[:, :, 5:] += torch.randn_like(x2[:, :, 5:])
    with torch.no_grad():
        z, z2 = enc(x), enc(x2)
        assert z.shape[2] == 3
        torch.testing.assert_close(z[:, :, :2], z2[:, :, :2], atol=0, rtol=0)
        assert not torch.allclose(z[:, :, 2], z2[:, :, 2])
        q2 = z.clone()
        q2[:, :, 2] += 1.0
        y, y2 = dec(z), dec(q2)
        assert y.shape[2] == 9
        torch.testing.assert_close(y[:, :, :5], y2[:, :, :5], atol=0, rtol=0)
        assert not torch.allclose(y[:, :, 5:], y2[:, :, 5:])


@pytest.mark.parametrize("T", [1, 5, 9, 17])
def test_causal_frame_counts(T):
    """1+4n frames -> 1+n latent frames -> 1+4n frames; an image is a 1-frame video."""
    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit2", temporal_downsample=(True, True), **TINY),
                         bottleneck=dict(kind="lfq", codebook_size=2 ** 6, dim=None),
                         discriminator=dict(enabled=False), loss=dict(perceptual_weight=0), num_frames=17,
                         resolution=16)
    v = torch.rand(1, 3, T, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = tok.encode(v)
        assert tokens.shape == (1, 1 + (T - 1) // 4, 4, 4) == (1, *tok.token_shape(T, 16, 16))
        assert tok.decode(tokens).shape == v.shape
    assert tok.latent_shape(T, 16, 16) == (6, 1 + (T - 1) // 4, 4, 4)


def test_config_errors_name_the_fix():
    arch = dict(kind="magvit2", temporal_downsample=(False, True, True))
    with pytest.raises(ConfigError, match=r"num_frames must be 1\+4n"):
        VideoTokenizer.validate_frames(16, arch)
    assert VideoTokenizer.validate_frames(17, arch) == 5
    assert VideoTokenizer.validate_frames(16, ArchConfig()) == 4
    with pytest.raises(ConfigError, match="multiple of 4"):
        VideoTokenizer.validate_frames(6, ArchConfig())
    with pytest.raises(ConfigError, match=r"num_frames must be 1\+4n"):
        VideoTokenizer(arch=arch, discriminator=dict(enabled=False), loss=dict(perceptual_weight=0), num_frames=16)
    with pytest.raises(ConfigError, match="norm_groups"):
        ArchConfig(filters=12, norm_groups=8).validate()
    with pytest.raises(ConfigError, match="log2"):
        VideoTokenizer(bottleneck=dict(kind="lfq", codebook_size=2 ** 10, dim=8), discriminator=dict(enabled=False))
    with pytest.raises(ConfigError, match="resolution must be a multiple of 8"):
        VideoTokenizer(discriminator=dict(enabled=False), loss=dict(perceptual_weight=0), resolution=100)


# ------------------------------------------------------------------------------------------------------------- LFQ
def test_lfq_index_formula_and_round_trip():
    torch.manual_seed(0)
    q = LookupFreeQuantizer(bits=5, entropy_weight=0)
    z = torch.randn(2, 5, 2, 3, 3)
    out = q(z)
    expect = sum((2 ** k) * (z[:, k] > 0).long() for k in range(5))
    assert torch.equal(out.indices, expect)
    codes = q.indices_to_latents(out.indices)
    assert torch.equal(codes, torch.where(z > 0, 1.0, -1.0))
    torch.testing.assert_close(out.latents, codes)
    assert torch.equal(q.encode(codes), out.indices)
    all_idx = torch.arange(32).view(1, 32, 1, 1)
    assert torch.equal(q.encode(q.indices_to_latents(all_idx)), all_idx)


def test_lfq_entropy_matches_direct_softmax_over_codes():
    """E[H(f(z))] − H(E f(z)) with f = softmax(−‖z−c‖²/τ) over all 2^K codes, computed directly."""
    torch.manual_seed(0)
    K, tau = 4, 0.5
    z = torch.randn(64, K) * 0.5
    codes = ((torch.arange(2 ** K)[:, None] >> torch.arange(K)) & 1).float() * 2 - 1
    p = torch.softmax(-torch.cdist(z, codes).pow(2) / tau, dim=-1)
    h_sample = -(p * p.log()).sum(-1).mean()
    pbar = p.mean(0)
    h_avg = -(pbar * torch.log(pbar + 1e-5)).sum()
    exact = LookupFreeQuantizer(bits=K, entropy_temperature=tau, entropy_group_bits=None)
    hs, ha = exact.entropy(z)
    torch.testing.assert_close(hs, h_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ha, h_avg, atol=1e-5, rtol=1e-5)
    grouped = LookupFreeQuantizer(bits=K, entropy_temperature=tau, entropy_group_bits=2)
    hs2, ha2 = grouped.entropy(z)
    torch.testing.assert_close(hs2, h_sample, atol=1e-5, rtol=1e-5)  # per-sample factorisation is exact
    assert ha2 >= h_avg - 1e-4  # sum of marginal entropies bounds the joint
    out = exact(z.T.reshape(1, K, 4, 4, 4), step=0)
    torch.testing.assert_close(out.terms["entropy"], h_sample - h_avg, atol=1e-5, rtol=1e-5)


def test_lfq_straight_through_and_commitment():
    torch.manual_seed(0)
    q = LookupFreeQuantizer(bits=3, commitment_weight=0.25, entropy_weight=0)
    z = torch.randn(1, 3, 1, 2, 2, requires_grad=True)
    out = q(z)
    out.latents.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    sign = torch.where(z > 0, 1.0, -1.0)
    torch.testing.assert_close(out.terms["commitment"], ((z - sign) ** 2).mean())
    torch.testing.assert_close(out.loss, 0.25 * ((z - sign) ** 2).mean())


def test_entropy_annealing():
    q = LookupFreeQuantizer(bits=3, entropy_weight=0.1, entropy_anneal_ratio=3.0, entropy_anneal_steps=100)
    z = torch.randn(1, 3, 1, 4, 4)
    base = q(z, step=100)
    early = q(z, step=50)
    e = base.terms["entropy"]
    torch.testing.assert_close(early.loss - base.loss, 0.1 * 3.0 * 0.5 * e)


# ------------------------------------------------------------------------------------------------------------- VQ
def test_vq_nearest_code_straight_through_and_losses():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=8, dim=4, entropy_weight=0.1, entropy_temperature=0.01)
    z = torch.randn(2, 4, 1, 3, 3, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 4, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, vq.codebook.detach()).argmin(1)
    assert torch.equal(out.indices.flatten(), nearest)
    q = vq.indices_to_latents(out.indices)
    torch.testing.assert_close(out.latents, q)
    mse = ((z.detach() - q.detach()) ** 2).mean()
    torch.testing.assert_close(out.terms["commitment"], mse)
    torch.testing.assert_close(out.terms["codebook"], mse)
    # entropy term: softmax over −‖z−c‖²/τ
    h_s, h_a = entropy_terms(-torch.cdist(flat, vq.codebook.detach()).pow(2) / 0.01)
    torch.testing.assert_close(out.terms["entropy"], h_s - h_a, atol=1e-4, rtol=1e-4)
    # straight-through: d(sum latents)/dz = 1, codebook gets nothing from it
    out.latents.sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    # commitment pulls only z, codebook loss moves only the codebook
    z.grad = None
    out.terms["commitment"].backward(retain_graph=True)
    torch.testing.assert_close(z.grad, 2 * (z.detach() - q.detach()) / z.numel())
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    z.grad = None
    out.terms["codebook"].backward()
    assert z.grad is None or not z.grad.any()
    assert vq.codebook.grad[out.indices.unique()].abs().sum() > 0


def test_codebook_metrics():
    u = CodebookUsage(4)
    u.update(torch.tensor([0, 0, 1, 1]))
    r = u.compute()
    assert r["usage"] == 0.5 and torch.isclose(r["perplexity"], torch.tensor(2.0, dtype=torch.float64))
    b = BitBalance(2)
    b.update(torch.tensor([0, 1, 2, 3]))
    assert b.compute() == 1.0
    b.reset()
    b.update(torch.tensor([1, 1]))
    assert b.compute() == 0.0


# ------------------------------------------------------------------------------------------------------------- GAN
def test_lecam_equals_formula():
    lecam = LeCamEMA(decay=0.9)
    lecam.ema_real.fill_(0.5)
    lecam.ema_fake.fill_(1.5)
    real, fake = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0])
    # relu(mean real − ema_fake)² + relu(ema_real − mean fake)² = relu(2 − 1.5)² + relu(0.5 + 0.5)²
    torch.testing.assert_close(lecam(real, fake), torch.tensor(0.25 + 1.0))
    lecam.update(real, fake)
    torch.testing.assert_close(lecam.ema_real, torch.tensor(0.9 * 0.5 + 0.1 * 2.0))
    torch.testing.assert_close(lecam.ema_fake, torch.tensor(0.9 * 1.5 + 0.1 * -0.5))
    assert lecam(torch.tensor([0.0]), torch.tensor([5.0])) == 0  # both hinges inactive
    assert "ema_real" in lecam.state_dict()


def test_nonsaturating_losses():
    r, f = torch.tensor([0.3, -1.0]), torch.tensor([2.0])
    torch.testing.assert_close(discriminator_loss(r, f), torch.log1p(torch.exp(-r)).mean() + torch.log1p(torch.exp(f)).mean())
    torch.testing.assert_close(generator_loss(f), torch.log1p(torch.exp(-f)).mean())


def test_r1_equals_autograd():
    """R1 = mean_b Σ(∂D/∂x_b)²: closed form for a linear D, per-sample autograd for the 3D StyleGAN D."""
    torch.manual_seed(0)
    w = torch.randn(3, 2, 4, 4)
    x = torch.randn(5, 3, 2, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1) + 0.7
    torch.testing.assert_close(r1_penalty(logits, x), (w ** 2).sum())
    d = StyleGANDiscriminator(3, 4, (2, 2), num_frames=2, resolution=8)
    x = torch.randn(3, 3, 2, 8, 8, requires_grad=True)
    r1 = r1_penalty(d(x), x)
    sq = []
    for i in range(3):
        xi = x[i:i + 1].detach().requires_grad_()
        (g,) = torch.autograd.grad(d(xi).sum(), xi)
        sq.append(g.pow(2).sum())
    torch.testing.assert_close(r1, torch.stack(sq).mean(), atol=1e-6, rtol=1e-4)
    r1.backward()  # create_graph: R1 is differentiable w.r.t. D's weights
    assert d.fc2.weight.grad is not None


# ------------------------------------------------------------------------------------------------------------- pooling
def test_pooling_keeps_single_frame_and_excludes_padding():
    x = torch.randn(1, 2, 1, 5, 5)
    y = avg_pool_same(x, (2, 2, 2))
    assert y.shape == (1, 2, 1, 3, 3)
    torch.testing.assert_close(y[..., -1, -1], x[..., -1, -1])  # the corner window holds one real element
    torch.testing.assert_close(y[..., 0, 0], x[..., :2, :2].mean((-1, -2)))
    b = BlurPool3d()(torch.ones(1, 2, 1, 8, 8))
    assert b.shape == (1, 2, 1, 4, 4)
    torch.testing.assert_close(b, torch.ones_like(b))  # normalised, padding excluded
    d = StyleGANDiscriminator(3, 4, (2, 2, 2, 2, 2), num_frames=16, resolution=128)
    assert d.feature_shape == (8, 1, 4, 4)  # T 16->8->4->2->1->1, 128->4 (§1.6)


# ------------------------------------------------------------------------------------------------------------- perceptual
def test_perceptual_off_warns_once_and_local_weights(tmp_path):
    import torchvision

    with pytest.warns(UserWarning, match="perceptual loss is OFF"):
        off = PerceptualLoss(None)
    x = torch.rand(1, 3, 2, 8, 8)
    assert not off.enabled and off(x, x) == 0
    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on = PerceptualLoss(str(path), arch="resnet18", resize=32)
    assert on.enabled and not list(on.parameters()) and not on.state_dict()
    fake = torch.rand(1, 3, 2, 8, 8, requires_grad=True)
    assert on(x, x) < 1e-10
    loss = on(x, fake)
    loss.backward()
    assert loss > 0 and fake.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="perceptual_weights"):
        PerceptualLoss(str(tmp_path / "missing.pt"))
