"""Diffusion core pinned against closed forms (spec latte_tora.md §2, §3.2)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from vidgen.lightning_modules.nn.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    RectifiedFlow,
    approx_standard_normal_cdf,
    classifier_free_guidance,
    combine_guidance,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    opensora_timestep_shift,
    space_timesteps,
    timestep_transform,
)


def ref_schedule(T=1000):
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    return betas, abar, np.append(1.0, abar[:-1])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Schedule, forward process, posterior
# ----------------------------------------------------------------------------------------------------------------------
def test_linear_and_cosine_schedules():
    d = create_diffusion()
    _, abar, _ = ref_schedule()
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12)
    c = create_diffusion(schedule="cosine", learn_sigma=False)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(c.alphas_cumprod[:500], [f((i + 1) / 1000) / f(0) for i in range(500)], rtol=1e-9)
    assert c.betas.max() <= 0.999


def test_q_sample_and_posterior_closed_forms():
    d = create_diffusion()
    betas, abar, abar_prev = ref_schedule()
    x0, noise, xt = rand(4, 3, 2, 2, seed=1), rand(4, 3, 2, 2, seed=2), rand(4, 3, 2, 2, seed=3)
    t = torch.tensor([0, 1, 500, 999])
    x0n, nn_, xtn, tn = x0.double().numpy(), noise.double().numpy(), xt.double().numpy(), t.numpy()
    col = lambda a: a[tn][:, None, None, None]

    want = np.sqrt(col(abar)) * x0n + np.sqrt(1 - col(abar)) * nn_
    np.testing.assert_allclose(d.q_sample(x0, t, noise).numpy(), want, atol=1e-5)

    # Bayes: q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})
    a = 1 - betas
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for row, ti in enumerate(tn):
        if ti == 0:  # the posterior is a point mass at x0; log variance clipped to beta~_1
            np.testing.assert_allclose(mean[row].numpy(), x0n[row], atol=1e-6)
            b1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
            assert float(log_var[row].flatten()[0]) == pytest.approx(math.log(b1), rel=1e-6)
            continue
        prec = 1 / (1 - abar_prev[ti]) + a[ti] / betas[ti]
        mu = (np.sqrt(abar_prev[ti]) * x0n[row] / (1 - abar_prev[ti]) + np.sqrt(a[ti]) * xtn[row] / betas[ti]) / prec
        np.testing.assert_allclose(mean[row].numpy(), mu, atol=1e-5)
        np.testing.assert_allclose(var[row].numpy(), np.full_like(mu, 1 / prec), rtol=1e-5)
        np.testing.assert_allclose(log_var[row].numpy(), np.full_like(mu, math.log(1 / prec)), rtol=1e-5)


def test_parameterisations_round_trip():
    d = create_diffusion(learn_sigma=False)
    x0, noise = rand(3, 2, 4, seed=4), rand(3, 2, 4, seed=5)
    t = torch.tensor([3, 400, 990])
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_x0_from_eps(xt, t, noise), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(d.predict_eps_from_x0(xt, t, x0), noise, atol=2e-4, rtol=0)
    torch.testing.assert_close(d.predict_x0_from_v(xt, t, d.v_target(x0, noise, t)), x0, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Likelihood terms
# ----------------------------------------------------------------------------------------------------------------------
def test_normal_kl_against_numerical_integration():
    for m1, lv1, m2, lv2 in [(0.3, -1.0, -0.2, 0.5), (1.0, 0.2, 1.0, 0.2), (-0.5, -3.0, 0.4, -2.0)]:
        s1, s2 = math.exp(0.5 * lv1), math.exp(0.5 * lv2)
        p, q = stats.norm(m1, s1), stats.norm(m2, s2)
        want, _ = integrate.quad(lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * s1, m1 + 12 * s1)
        got = normal_kl(torch.tensor(m1, dtype=torch.float64), lv1, torch.tensor(m2, dtype=torch.float64), lv2)
        assert float(got) == pytest.approx(want, abs=1e-7)


def adm_discretized_ll(x, mu, sd):
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    plus, minus = cdf((x - mu + 1 / 255) / sd), cdf((x - mu - 1 / 255) / sd)
    return np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))))


def test_discretized_gaussian_log_likelihood():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 0.999], dtype=torch.float64)
    means = torch.tensor([-0.9, -0.45, 0.02, 0.5, 0.95, 0.99], dtype=torch.float64)
    log_scales = torch.tensor([-2.0, -3.0, -1.0, -2.5, -2.0, -4.0], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means, log_scales).numpy()
    xs, mu, sd = x.numpy(), means.numpy(), np.exp(log_scales.numpy())
    # 1) exactly ADM's formula (tanh CDF), transcribed in numpy
    np.testing.assert_allclose(got, adm_discretized_ll(xs, mu, sd), rtol=1e-12)
    # 2) close to the exact Gaussian mass of the bin (numerical integration / scipy tails); the tanh CDF is
    #    accurate to ~2e-4 in probability, so only bins with non-negligible mass are compared
    for i in range(len(xs)):
        if xs[i] < -0.999:
            exact = stats.norm.logcdf(xs[i] + 1 / 255, mu[i], sd[i])
        elif xs[i] > 0.999:
            exact = stats.norm.logsf(xs[i] - 1 / 255, mu[i], sd[i])
        else:
            mass, _ = integrate.quad(stats.norm(mu[i], sd[i]).pdf, xs[i] - 1 / 255, xs[i] + 1 / 255)
            exact = math.log(mass)
        assert got[i] == pytest.approx(exact, abs=0.03), i
    z = torch.linspace(-4, 4, 81, dtype=torch.float64)
    np.testing.assert_allclose(approx_standard_normal_cdf(z).numpy(), stats.norm.cdf(z.numpy()), atol=2e-4)


def test_vb_terms_learned_range_by_hand():
    d = create_diffusion()
    betas, abar, abar_prev = ref_schedule()
    x0, noise = rand(2, 1, 3, seed=6).double(), rand(2, 1, 3, seed=7).double()
    eps_hat, v = rand(2, 1, 3, seed=8) * 0.5, torch.tensor([[[0.3, -0.7, 1.4]], [[0.0, 0.5, -1.2]]])
    t = torch.tensor([0, 250])
    xt = d.q_sample(x0.float(), t, noise.float())
    vb = d.vb_terms_bpd(torch.cat([eps_hat, v], dim=1), x0.float(), xt, t)["output"]
    for row, ti in enumerate(t.tolist()):
        xtn, x0n, en, vn = (a[row, 0].double().numpy() for a in (xt, x0, eps_hat, v))
        post_var = betas * (1 - abar_prev) / (1 - abar)
        min_log = math.log(post_var[1] if ti == 0 else post_var[ti])
        frac = (vn + 1) / 2
        log_var = frac * math.log(betas[ti]) + (1 - frac) * min_log
        x0_hat = np.sqrt(1 / abar[ti]) * xtn - np.sqrt(1 / abar[ti] - 1) * en
        c1 = betas[ti] * np.sqrt(abar_prev[ti]) / (1 - abar[ti])
        c2 = (1 - abar_prev[ti]) * np.sqrt(1 - betas[ti]) / (1 - abar[ti])
        mu_model = c1 * x0_hat + c2 * xtn
        if ti == 0:  # decoder NLL with ADM's tanh CDF (checked against the exact CDF above)
            want = -np.mean(adm_discretized_ll(x0n, mu_model, np.exp(0.5 * log_var))) / math.log(2)
            assert float(vb[row]) == pytest.approx(want, rel=1e-3)
        else:
            mu_true = c1 * x0n + c2 * xtn
            tlv = math.log(post_var[ti])
            kl = 0.5 * (-1 + log_var - tlv + np.exp(tlv - log_var) + (mu_true - mu_model) ** 2 * np.exp(-log_var))
            assert float(vb[row]) == pytest.approx(np.mean(kl) / math.log(2), rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Respacing
# ----------------------------------------------------------------------------------------------------------------------
def test_space_timesteps_rules():
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
    assert s250 == [math.floor(i * 999 / 249 + 0.5) for i in range(250)]
    assert set(np.diff(s250)) <= {4, 5}
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    s3 = space_timesteps(1000, "10,10,10")  # sections of 334, 333, 333 steps
    assert len(s3) == 30 and s3[:10] == [37 * i for i in range(10)] and s3[10] == 334 and s3[-1] == 999
    assert space_timesteps(300, "10,15,20")[:2] == [0, 11]  # ADM docstring example: 100 steps -> 10 (stride 11)
    assert space_timesteps(1000, "") == list(range(1000))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim600")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "20")


def test_respaced_process_keeps_alphas_and_maps_timesteps():
    base = create_diffusion()
    for spec in ("250", "ddim50", "10,10,10"):
        sp = base.respaced(spec)
        kept = space_timesteps(1000, spec)
        assert sp.timestep_map.tolist() == kept
        np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
        np.testing.assert_allclose(sp.betas, 1 - sp.alphas_cumprod / np.append(1.0, sp.alphas_cumprod[:-1]), rtol=1e-12)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    sp = base.respaced("ddim50")
    sp.training_losses(model, rand(2, 3, 4), t=torch.tensor([0, 49]))
    assert seen[-1].tolist() == [0, 980] and seen[-1].dtype == torch.long
    create_diffusion(respacing="250").training_losses(model, rand(2, 3, 4), t=torch.tensor([1, 249]))
    assert seen[-1].tolist() == [4, 999]


# ----------------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------------
def oracle(x0, predict="eps", learn_sigma=True):
    """A model that knows x0: returns the exact eps / x0 / v for (x_t, original t)."""
    _, abar, _ = ref_schedule()
    abar = torch.from_numpy(abar)

    def fn(x, t):
        a = abar[t].view(-1, *([1] * (x.ndim - 1)))
        eps = (x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0.double().expand_as(eps), "v": a.sqrt() * eps - (1 - a).sqrt() * x0.double()}[predict]
        out = out.float()
        return torch.cat([out, torch.zeros_like(out)], dim=1) if learn_sigma else out

    return fn


@pytest.mark.parametrize(
    "sampler,steps,predict,learn_sigma",
    [("ddpm", 50, "eps", True), ("ddpm", "ddim20", "eps", False), ("ddim", "ddim25", "eps", True),
     ("ddim", 40, "x0", False), ("ddim", 40, "v", True)],
)
def test_sampler_with_true_prediction_recovers_x0(sampler, steps, predict, learn_sigma):
    x0 = rand(2, 3, 4, 4, seed=9).clamp(-1, 1)
    d = create_diffusion(predict=predict, learn_sigma=learn_sigma)
    out = d.sample(oracle(x0, predict, learn_sigma), x0.shape, sampler=sampler, steps=steps,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)


def test_channel_axis_two_latte_layout():
    """Latte's official layout is [B, F, C, H, W]: learned-sigma split and guidance on dim 2."""
    x0 = rand(2, 3, 4, 2, 2, seed=24).clamp(-1, 1)  # B, F, C, H, W
    d = create_diffusion(channel_dim=2)
    _, abar, _ = ref_schedule()

    def model(x, t, y):
        a = torch.from_numpy(abar)[t].view(-1, 1, 1, 1, 1).float()
        target = x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1, 1)  # CFG runs [cond; uncond] as one batch
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        return torch.cat([eps + 0.0 * y.view(-1, 1, 1, 1, 1), torch.zeros_like(eps)], dim=2)

    kw = dict(model_kwargs={"y": torch.tensor([1.0, 2.0])}, uncond_kwargs={"y": torch.tensor([0.0, 0.0])})
    out = d.sample(model, x0.shape, "ddim", 20, cfg_scale=4.0, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)
    terms = d.training_losses(model, x0, {"y": torch.ones(2)}, t=torch.tensor([0, 10]))
    assert terms["mse"].max() < 1e-6


def test_ddim_eta0_is_deterministic():
    torch.manual_seed(0)
    w = torch.randn(3, 6)

    def model(x, t):  # some nonlinear eps / variance model
        h = torch.einsum("bchw,co->bohw", torch.tanh(x), w) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
        return h

    d = create_diffusion()
    noise = rand(2, 3, 4, 4, seed=11)
    run = lambda g, eta=0.0: d.sample(model, noise.shape, "ddim", 20, noise=noise, generator=g, eta=eta)
    a = run(torch.Generator().manual_seed(1))
    b = run(torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = run(torch.Generator().manual_seed(1), eta=1.0)
    e = run(torch.Generator().manual_seed(2), eta=1.0)
    assert not torch.allclose(c, e)
    # DDPM is seeded too
    p1 = d.sample(model, (2, 3, 4, 4), "ddpm", 10, generator=torch.Generator().manual_seed(5))
    p2 = d.sample(model, (2, 3, 4, 4), "ddpm", 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(p1, p2)


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------
def test_hybrid_loss_stop_gradient_on_mean():
    d = create_diffusion()
    x0 = rand(3, 4, 2, 2, seed=12)
    out = (rand(3, 8, 2, 2, seed=13) * 0.3).requires_grad_(True)
    terms = d.training_losses(lambda x, t: out, x0, t=torch.tensor([0, 10, 700]), noise=rand(3, 4, 2, 2, seed=14))
    assert set(terms) == {"loss", "mse", "vb", "t"} and terms["loss"].shape == (3,)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert (g_vb[:, :4] == 0).all() and (g_vb[:, 4:].abs() > 0).all()
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert (g_mse[:, 4:] == 0).all() and (g_mse[:, :4].abs() > 0).any()


@pytest.mark.parametrize("predict", ["eps", "x0", "v"])
def test_mse_targets(predict):
    x0, noise = rand(2, 3, 4, seed=15), rand(2, 3, 4, seed=16)
    d = create_diffusion(predict=predict, learn_sigma=False)
    terms = d.training_losses(oracle(x0, predict, False), x0, t=torch.tensor([5, 600]), noise=noise)
    assert set(terms) == {"loss", "mse", "t"}
    assert terms["mse"].max() < 1e-8
    d.training_losses(lambda x, t: torch.zeros_like(x), x0)  # shapes OK without t/noise


def test_training_losses_seeded_and_masked():
    d = create_diffusion(learn_sigma=False)
    x0 = rand(2, 3, 4, seed=17)
    model = lambda x, t: torch.zeros_like(x)
    a = d.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
    b = d.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    noise = rand(2, 3, 4, seed=18)
    mask = torch.tensor([True, False, True]).view(1, 3, 1)
    m = d.training_losses(model, x0, t=torch.tensor([1, 2]), noise=noise, mask=mask)
    torch.testing.assert_close(m["mse"], (noise[:, [0, 2]] ** 2).mean(dim=(1, 2)))


def test_model_output_shape_checked():
    d = create_diffusion()
    with pytest.raises(ValueError, match="2C=6"):
        d.training_losses(lambda x, t: x, rand(2, 3, 4))


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------------
def cond_model(x, t, y):
    """Output 2C channels whose values depend on the label y (one per sample)."""
    yv = y.float().view(-1, 1, 1)
    return torch.cat([x * (1 + yv), x * 0 + yv + t.float().view(-1, 1, 1) / 1000], dim=1)


def test_cfg_scale_one_is_the_conditional_model():
    x, t, y = rand(2, 4, 3, seed=19), torch.tensor([3, 7]), torch.tensor([1, 2])
    g = classifier_free_guidance(cond_model, 1.0, {"y": torch.tensor([9, 9])})
    assert torch.equal(g(x, t, y=y), cond_model(x, t, y))


@pytest.mark.parametrize("guided,batched", [(None, True), (4, True), (3, False), ([0, 2], True)])
def test_cfg_formula_and_guided_channels(guided, batched):
    x, t, y, null = rand(2, 4, 3, seed=20), torch.tensor([3, 7]), torch.tensor([1, 2]), torch.tensor([5, 5])
    s = 4.0
    g = classifier_free_guidance(cond_model, s, {"y": null}, guided_channels=guided, batched=batched)
    out = g(x, t, y=y)
    c, u = cond_model(x, t, y), cond_model(x, t, null)
    idx = {None: list(range(8)), 4: [0, 1, 2, 3], 3: [0, 1, 2], (0, 2): [0, 2]}[tuple(guided) if isinstance(guided, list) else guided]
    rest = [i for i in range(8) if i not in idx]
    torch.testing.assert_close(out[:, idx], u[:, idx] + s * (c[:, idx] - u[:, idx]))
    torch.testing.assert_close(out[:, rest], c[:, rest])  # unguided channels stay conditional


def test_sampler_cfg_guides_latent_channels_only():
    """In the sampler, guided_channels=None means the C latent channels (Latte); variance channels stay conditional."""
    seen = {}

    def model(x, t, y):
        seen["batch"] = x.shape[0]
        return torch.cat([torch.zeros_like(x) + y.float().view(-1, 1, 1) * 1e-3, torch.zeros_like(x)], dim=1)

    d = create_diffusion()
    kw = dict(model_kwargs={"y": torch.tensor([1, 2])}, uncond_kwargs={"y": torch.tensor([0, 0])})
    out = d.sample(model, (2, 4, 3), steps=5, cfg_scale=3.0, generator=torch.Generator().manual_seed(0), **kw)
    assert seen["batch"] == 4 and out.shape == (2, 4, 3)
    with pytest.raises(ValueError, match="uncond_kwargs"):
        d.sample(model, (2, 4, 3), steps=5, cfg_scale=3.0, model_kwargs={"y": torch.tensor([1, 2])})
    c = torch.randn(2, 8, 3)
    u = torch.randn(2, 8, 3)
    torch.testing.assert_close(combine_guidance(c, u, 1.0), c)
    with pytest.raises(ValueError, match="same keys"):
        classifier_free_guidance(cond_model, 2.0, {"z": 1})(rand(2, 4, 3), torch.tensor([1, 2]), y=torch.tensor([1, 2]))


# ----------------------------------------------------------------------------------------------------------------------
# Rectified flow
# ----------------------------------------------------------------------------------------------------------------------
def velocity_oracle(x0, learn_sigma=False):
    def fn(x, t):
        tau = (t.double() / 1000).view(-1, *([1] * (x.ndim - 1)))
        v = ((x0.double() - x.double()) / tau).float()  # = x0 - eps on the straight path
        return torch.cat([v, torch.randn_like(v)], dim=1) if learn_sigma else v

    return fn


def test_flow_path_and_loss():
    f = create_diffusion(process="flow", learn_sigma=False)
    x0, noise = rand(2, 3, 4, seed=21), rand(2, 3, 4, seed=22)
    t = torch.tensor([250.0, 900.0])
    xt = f.add_noise(x0, noise, t)
    torch.testing.assert_close(xt[1], 0.1 * x0[1] + 0.9 * noise[1])
    terms = f.training_losses(lambda x, tt: x0 - noise, x0, t=t, noise=noise)
    assert terms["loss"].shape == (2,) and terms["loss"].max() < 1e-12
    g = torch.Generator().manual_seed(0)
    ts = f.sample_timesteps(4096, g)
    assert ts.min() > 0 and ts.max() < 1000 and abs(float(ts.median()) - 500) < 30  # sigmoid(N(0,1)) has median 1/2
    # masked frames get the clean x0 and leave the loss
    mask = torch.tensor([True, False, True, True]).view(1, 1, 4)
    seen = {}

    def model(x, tt):
        seen["x"] = x
        return torch.zeros_like(x)

    m = f.training_losses(model, x0, t=t, noise=noise, mask=mask)
    torch.testing.assert_close(seen["x"][..., 1], x0[..., 1])
    torch.testing.assert_close(m["mse"], ((x0 - noise)[..., [0, 2, 3]] ** 2).mean(dim=(1, 2)))


def test_timestep_shift():
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    torch.testing.assert_close(timestep_transform(t, 1.0), t)
    torch.testing.assert_close(timestep_transform(t, 3.0), torch.tensor([0.0, 500.0, 750.0, 1000.0]))
    r = opensora_timestep_shift(torch.tensor([720, 256]), torch.tensor([1280, 256]), torch.tensor([51, 1]))
    torch.testing.assert_close(r, torch.tensor([math.sqrt(720 * 1280 / 512**2) * math.sqrt(15), 0.5]))


@pytest.mark.parametrize("shift", [None, 3.0, torch.tensor([1.0, 2.5])])
def test_euler_with_true_velocity_recovers_x0(shift):
    x0 = rand(2, 4, 3, 3, seed=23)
    f = create_diffusion(process="flow")  # learn_sigma: 2C outputs, the extra C ignored
    out = f.sample(velocity_oracle(x0, learn_sigma=True), x0.shape, steps=7, shift=shift,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_euler_step_schedule_matches_opensora():
    seen = []
    f = RectifiedFlow(sample_steps=4)
    f.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), (1, 2), generator=torch.Generator())
    assert seen == [1000.0, 750.0, 500.0, 250.0]


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------
def test_config_defaults_and_errors():
    d = create_diffusion(DiffusionConfig())
    assert isinstance(d, GaussianDiffusion) and d.loss == "hybrid" and d.predict == "eps" and d.sampler == "ddpm"
    assert create_diffusion(learn_sigma=False).loss == "mse"
    assert isinstance(create_diffusion({"process": "flow"}), RectifiedFlow)
    for bad, match in [
        (dict(loss="hybrid", learn_sigma=False), "learn_sigma=True"),
        (dict(loss="mse"), "needs loss='hybrid'"),
        (dict(schedule="quadratic"), "schedule"),
        (dict(predict="score"), "predict"),
        (dict(respacing="ddim600"), "integer stride"),
        (dict(sampler="euler"), "'ddpm' or 'ddim'"),
        (dict(process="flow", sampler="ddim"), "euler"),
        (dict(process="flow", respacing="250"), "respacing"),
        (dict(process="diffusion"), "process"),
    ]:
        with pytest.raises(ValueError, match=match):
            DiffusionConfig(**bad)
    with pytest.raises(ValueError, match="euler"):
        create_diffusion().sample(lambda x, t: x, (1, 2), sampler="euler")
