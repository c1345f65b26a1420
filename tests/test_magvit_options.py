"""MAGVIT options that are not in the paper (issue 10 §1, the demo's MAGVIT stage):
``task_guidance_scale`` (a per-task CFG scale), ``decode_order: frames`` (one latent frame after the other),
``task_train_mask: frames`` (training masks that decoding order sees) and ``position_embedding: factorized``
(e_t + e_h + e_w). All default to the paper's behaviour (``None`` / ``"all"`` / ``None`` / ``"absolute"``)."""

from __future__ import annotations

import math

import pytest
import torch
from test_magvit import _video, tiny_model

import vidgen.lightning_modules.magvit as magvit_mod
from vidgen.lightning_modules.magvit import TASKS, MagvitConfig, MagvitConfigError, MaskedVideoTransformer
from vidgen.lightning_modules.nn.masking import masked_decode

torch.set_num_threads(1)


def test_defaults_are_the_papers():
    c = MagvitConfig()
    assert c.task_guidance_scale is None and c.decode_order == "all"


def test_task_guidance_scale_overrides_per_task(monkeypatch):
    """``task_guidance_scale: {FP: 0}`` decodes FP with the conditional logits alone, CG with ``ℓ_c + s(ℓ_c − ℓ_u)``."""
    captured = {}

    def fake_decode(logits_fn, fallback, *args, **kwargs):
        captured["fn"] = logits_fn
        return fallback.clamp(max=15)

    monkeypatch.setattr(magvit_mod, "masked_decode", fake_decode)
    torch.manual_seed(0)
    m = tiny_model(tasks=["CG", "FP"], class_dropout_prob=0.1, guidance_scale=2.0, task_guidance_scale={"FP": 0.0})
    m.eval()
    assert m.guidance_for("FP") == 0.0 and m.guidance_for("CG") == 2.0
    labels, v = torch.tensor([0, 3]), _video(2)
    tokens = torch.randint(0, 16, (2, m.num_tokens))
    unknown = torch.rand(2, m.num_tokens) < 0.5
    with torch.no_grad():
        lc = m(m.prefix(TASKS["CG"], labels, 2), tokens)
        lu = m(m.prefix(TASKS["CG"], labels, 2, drop=torch.ones(2, dtype=torch.bool)), tokens)
        fp = m(m.prefix(TASKS["FP"], None, 2), tokens)
    m.sample_tokens("CG", 2, labels)
    assert torch.allclose(captured["fn"](tokens, unknown), lc + 2.0 * (lc - lu), atol=1e-5)
    m.sample_tokens("FP", 2, video=v)
    assert torch.allclose(captured["fn"](tokens, unknown), fp, atol=1e-5)
    m.config.task_guidance_scale = None  # the default: every task uses guidance_scale
    m.sample_tokens("FP", 2, video=v)
    assert not torch.allclose(captured["fn"](tokens, unknown), fp, atol=1e-4)


def test_task_guidance_scale_is_validated():
    base = dict(codebook_size=16, token_shape=[4, 4, 4], num_frames=8, resolution=16)
    with pytest.raises(MagvitConfigError, match="class_dropout_prob"):
        MaskedVideoTransformer.validate_config({**base, "task_guidance_scale": {"CG": 2.0}})
    with pytest.raises(MagvitConfigError, match="unknown MAGVIT task"):
        MaskedVideoTransformer.validate_config({**base, "class_dropout_prob": 0.1, "task_guidance_scale": {"XX": 1}})
    with pytest.raises(MagvitConfigError, match="decode_order"):
        MaskedVideoTransformer.validate_config({**base, "decode_order": "rows"})


def test_decode_order_frames_is_algorithm_1_per_latent_frame(monkeypatch):
    """``decode_order: frames`` = Algorithm 1 on latent frame 0 (ceil(K/t) steps), then frame 1 given frame 0, ...:
    with logits that ignore the input, the tokens equal masked_decode run frame by frame with the same generator;
    the model sees the later frames as [MASK] and the earlier ones as already decoded."""
    torch.manual_seed(0)
    m = tiny_model(tasks=["CG"], decode_steps=10, choice_temperature=2.0, decode_order="frames")
    m.eval()
    t, per, n = m.token_grid[0], m.num_tokens // m.token_grid[0], 2
    steps = math.ceil(10 / t)
    fixed = torch.randn(n, m.num_tokens, 16)
    seen = []

    def fake_forward(prefix, visual):
        seen.append(visual.clone())
        return fixed

    monkeypatch.setattr(m, "forward", fake_forward)
    got = m.sample_tokens("CG", n, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(3))
    got = got.reshape(n, -1)
    g = torch.Generator().manual_seed(3)
    mask = m.vocab.mask_id
    want = torch.cat([masked_decode(lambda tok, unk, k=k: fixed[:, k * per:(k + 1) * per],
                                    torch.full((n, per), mask), steps, 1.0, 2.0, "cosine", g) for k in range(t)], 1)
    assert torch.equal(got, want)
    assert len(seen) == t * steps
    for i, vis in enumerate(seen):
        k = i // steps
        assert bool((vis[:, (k + 1) * per:] == mask).all())           # later frames: [MASK]
        assert torch.equal(vis[:, :k * per], got[:, :k * per])        # earlier frames: already decoded
    # the paper's order decodes every position at once: the first step after step 0 already fixes tokens everywhere
    m.config.decode_order = "all"
    seen.clear()
    m.sample_tokens("CG", n, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(3))
    assert len(seen) == 10


def test_decode_order_frames_keeps_the_commit_condition():
    """FP under ``decode_order: frames``: the later frames hold their fallback (z̃ in the condition region, [MASK]
    elsewhere) until their turn; the history covers all N positions and every step decodes within one frame."""
    m = tiny_model(tasks=["FP", "CG"], decode_order="frames", decode_steps=8)
    v = _video(2)
    tokens, hist = m.sample_tokens("FP", 2, video=v, generator=torch.Generator().manual_seed(0), return_history=True)
    t, per = m.token_grid[0], m.num_tokens // m.token_grid[0]
    assert tokens.shape == (2, *m.token_grid) and len(hist) == t * 2
    for i, st in enumerate(hist):
        k = i // 2
        assert st.inputs.shape == (2, m.num_tokens)
        assert not bool(st.unknown[:, :k * per].any()) and bool(st.unknown[:, (k + 1) * per:].all())


def test_factorized_position_embedding_math():
    """``position_embedding: factorized`` (not in MAGVIT): the prefix keeps absolute embeddings, the visual token at
    latent (t, h, w) gets ``e_t + e_h + e_w``; ``absolute`` (default) is one embedding per sequence position."""
    torch.manual_seed(0)
    m = tiny_model(tasks=["CG", "FP"], position_embedding="factorized")
    emb = m.net.embed
    t, h, w = m.token_grid
    P = m.prefix_len
    pos = torch.arange(P + m.num_tokens)
    got = emb.position_embedding(pos)
    assert torch.equal(got[:P], emb.position.weight[:P])
    for i in (0, 5, 17, m.num_tokens - 1):
        ti, hi, wi = i // (h * w), (i // w) % h, i % w
        want = emb.pos_t.weight[ti] + emb.pos_h.weight[hi] + emb.pos_w.weight[wi]
        assert torch.allclose(got[P + i], want)
    # shared across places: two tokens in the same frame and row differ only by their column embeddings
    assert torch.allclose(got[P + 1] - got[P], emb.pos_w.weight[1] - emb.pos_w.weight[0])
    # the model's forward uses it: word + position, then the embedding LN
    visual = torch.randint(0, 16, (2, m.num_tokens))
    prefix = m.prefix(TASKS["CG"], torch.tensor([0, 1]), 2)
    seq = torch.cat([prefix, visual], 1)
    x = emb.norm(emb.word(seq) + got[None])
    for layer in m.net.layers:
        x = layer(x)
    with torch.no_grad():
        assert torch.allclose(m(prefix, visual), m.net.head(x[:, P:], emb.word.weight, 16), atol=1e-5)
    a = tiny_model(tasks=["CG", "FP"])
    assert a.net.embed.position.weight.shape[0] == P + a.num_tokens and not hasattr(a.net.embed, "pos_t")
    with pytest.raises(MagvitConfigError, match="position_embedding"):
        MaskedVideoTransformer.validate_config({"codebook_size": 16, "token_shape": [4, 4, 4], "num_frames": 8,
                                                "resolution": 16, "position_embedding": "rope"})


def test_task_decode_order_overrides_per_task(monkeypatch):
    """``task_decode_order: {FP: frames}``: FP decodes frame by frame (t·ceil(K/t) passes, later frames held at
    their fallback), CG in the paper's all-at-once order (K passes)."""
    torch.manual_seed(0)
    m = tiny_model(tasks=["CG", "FP"], decode_steps=10, task_decode_order={"FP": "frames"})
    m.eval()
    assert m.decode_order_for("FP") == "frames" and m.decode_order_for("CG") == "all"
    t, per = m.token_grid[0], m.num_tokens // m.token_grid[0]
    calls = []
    real = m.forward

    def spy(prefix, visual):
        calls.append(visual.clone())
        return real(prefix, visual)

    monkeypatch.setattr(m, "forward", spy)
    m.sample_tokens("CG", 2, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 10
    calls.clear()
    m.sample_tokens("FP", 2, video=_video(2), generator=torch.Generator().manual_seed(0))
    assert len(calls) == t * math.ceil(10 / t)
    assert bool((calls[0][:, per:] == m.vocab.mask_id).all())   # frames 1..: [MASK] (FP's condition is frame 0)
    with pytest.raises(MagvitConfigError, match="decode_order"):
        MaskedVideoTransformer.validate_config({"codebook_size": 16, "token_shape": [4, 4, 4], "num_frames": 8,
                                                "resolution": 16, "task_decode_order": {"FP": "rows"}})


def test_frame_suffix_mask_is_what_frame_by_frame_decoding_sees():
    """``frame_suffix_mask``: per row a latent frame k; frames before it unmasked, ``num_masked(h*w, r)`` of frame k
    masked, every later frame masked; every k occurs."""
    from vidgen.lightning_modules.nn.masking import frame_suffix_mask, num_masked

    t, h, w, r = 4, 3, 5, 0.4
    m = frame_suffix_mask(400, (t, h, w), r, torch.Generator().manual_seed(0)).view(400, t, h * w)
    per_frame = m.sum(-1)
    seen = set()
    for row in per_frame.tolist():
        k = next(i for i, n in enumerate(row) if n > 0)
        assert row[:k] == [0] * k and row[k] == num_masked(h * w, r) and row[k + 1:] == [h * w] * (t - k - 1)
        seen.add(k)
    assert seen == set(range(t))


def test_task_train_mask_frames_masks_fp_steps_by_frame_suffix(monkeypatch):
    """``task_train_mask: {FP: frames}`` (not in MAGVIT): FP's COMMIT loss masks a frame suffix, CG keeps the paper's
    random positions; unknown kinds are one config error."""
    assert MagvitConfig().task_train_mask is None
    torch.manual_seed(0)
    m = tiny_model(tasks=["CG", "FP"], task_train_mask={"FP": "frames"})
    used = []
    real_suffix, real_random = magvit_mod.frame_suffix_mask, magvit_mod.random_token_mask
    monkeypatch.setattr(magvit_mod, "frame_suffix_mask", lambda *a, **k: used.append("frames") or real_suffix(*a, **k))
    monkeypatch.setattr(magvit_mod, "random_token_mask", lambda *a, **k: used.append("random") or real_random(*a, **k))
    batch = {"video": _video(2), "label": torch.tensor([0, 1])}
    for task in ("FP", "CG"):
        out = m.commit_loss(batch, task, 0.5, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out["loss"])
    assert used == ["frames", "random"]
    with pytest.raises(MagvitConfigError, match="task_train_mask"):
        MaskedVideoTransformer.validate_config({"codebook_size": 16, "token_shape": [4, 4, 4], "num_frames": 8,
                                                "resolution": 16, "task_train_mask": {"FP": "rows"}})
