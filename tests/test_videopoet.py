"""VideoPoet (spec make_a_video_videopoet.md Part 2): vocabulary and every layout's token sequence, the prefix-LM
mask (bidirectional prefix, causal output, loss on outputs only), KV-cache decoding = full forward, the AGD group
sampler, the 90/10 curriculum switch across a resume, and a tiny LM that memorises sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidgen.lightning_modules.nn.attention import KVCache, prefix_lm_mask
from vidgen.lightning_modules.nn.sampling import filter_logits
from vidgen.lightning_modules.videopoet import (LAYOUTS, GroupSampler, PrefixLM, PrefixLMConfig, StructureCondition,
                                                VideoPoet, VideoPoetConfigError, Vocabulary, build_sequences,
                                                cut_parts, padding_fraction)

K = 16  # visual codes in the hand-built examples


def _vp(**kw):
    args = dict(size="tiny", visual_codes=K, text_dim=8, max_text_tokens=3, audio_levels=2, audio_codes=4,
                tasks={"t2i": 1, "t2v": 1, "i2v": 1, "fp": 1}, warmup_steps=0, text_dropout=0.0, lr=3e-3,
                condition_latents=1)
    args.update(kw)
    return VideoPoet(**args)


# ------------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_ranges_match_the_paper():
    v = Vocabulary()  # 2^18 visual, 4 x 1024 audio
    assert v.visual_offset == 256 and v.audio_offset == 262_400 and v.size == 266_496
    assert v.audio(torch.tensor([[[5], [5], [5], [5]]])).tolist() == [[262_405, 263_429, 264_453, 265_477]]
    assert len(v.names) <= 256 and v.special("<bos>") < 256


# ------------------------------------------------------------------------------------------------ layouts
def _seq(name, tokens, audio=None, commit=None, text_len=None, meta=None, c=1):
    v = Vocabulary(K, audio_levels=2, audio_codes=4)
    parts = cut_parts(LAYOUTS[name], v, tokens, audio, commit, None, c, avcont_audio_frames=1)
    return v, build_sequences(LAYOUTS[name], v, parts, tokens.shape[0], text_len, 3, meta)


def _names(v, row):
    out = []
    for t in row.tolist():
        if t < 256:
            out.append(v.names[t])
        elif t < v.audio_offset:
            out.append(f"v{t - 256}")
        else:
            a = t - v.audio_offset
            out.append(f"a{a // 4}:{a % 4}")
    return out


def test_every_layout_token_sequence():
    tokens = torch.tensor([[[[1, 2]], [[3, 4]], [[5, 6]]]])      # [1, t=3, h=1, w=2]
    audio = torch.tensor([[[0, 1, 2], [3, 0, 1]]])               # [1, levels=2, frames=3]
    txt = torch.tensor([2])
    T = ["<bot_i>", "<text>", "<text>", "<text>", "<eot_i>"]
    V = ["v1", "v2", "v3", "v4", "v5", "v6"]

    v, s = _seq("t2i", tokens[:, :1], text_len=txt)
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:image>", *T, "<bov_o>", "v1", "v2"]  # no <eov_o>, no <eos>
    assert s.prefix_len == 7 and s.loss_mask.tolist() == [False] * 7 + [True] * 3
    assert s.key_valid[0].tolist() == [True, True, True, True, True, False, True, True, True, True]

    v, s = _seq("t2v", tokens, text_len=txt, meta={"duration": "<dur:0>", "res": "<res:128x224>", "source": "<source:3>"})
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:video>", *T, "<source:3>", "<res:128x224>", "<dur:0>",
                                      "<bov_o>", *V, "<eov_o>", "<eos>"]
    assert s.prefix_len == 10

    v, s = _seq("uncond", tokens)
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:video>", "<bov_o>", *V, "<eov_o>", "<eos>"]

    v, s = _seq("i2v", tokens)  # text optional: absent -> dropped with its specials
    names = _names(v, s.tokens[0])
    assert names == ["<bos>", "<task:video>", "<bov_i>", "v1", "v2", "<eov_i>", "<bov_o>", *V, "<eov_o>", "<eos>"]
    assert s.prefix_len == 6
    # the forced first frame carries no loss; the rest of the video and the end tokens do
    assert s.loss_mask.tolist() == [False] * 6 + [True, False, False, True, True, True, True, True, True]

    v, s = _seq("fp", tokens, c=1)
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:fp>", "<bov_i>", "v1", "v2", "<eov_i>", "<bov_o>",
                                      "v3", "v4", "v5", "v6", "<eov_o>", "<eos>"]

    commit = torch.tensor([[[[1, -1]], [[-1, 4]], [[5, -1]]]])
    for name in ("inpaint", "outpaint"):
        v, s = _seq(name, tokens, commit=commit)
        assert _names(v, s.tokens[0]) == ["<bos>", "<task:paint>", "<bov_i>", "v1", "<mask>", "<mask>", "v4", "v5",
                                          "<mask>", "<eov_i>", "<bov_o>", *V, "<eov_o>", "<eos>"]

    v, s = _seq("v2a", tokens, audio=audio)
    A = ["a0:0", "a0:1", "a0:2", "a1:3", "a1:0", "a1:1"]  # level-major, level offsets
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:audio>", "<bov_i>", *V, "<eov_i>", "<boa_o>", *A, "<eoa_o>",
                                      "<eos>"]
    assert s.modality[s.spans["audio"][0]:s.spans["audio"][1]] == ["audio:0"] * 3 + ["audio:1"] * 3

    v, s = _seq("a2v", tokens, audio=audio)
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:video>", "<boa_i>", *A, "<eoa_i>", "<bov_o>", *V, "<eov_o>",
                                      "<eos>"]

    v, s = _seq("avcont", tokens, audio=audio)
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:av>", "<bov_i>", "v1", "v2", "<eov_i>", "<boa_i>", "a0:0",
                                      "a1:3", "<eoa_i>", "<bov_o>", "v3", "v4", "v5", "v6", "<eov_o>", "<boa_o>",
                                      "a0:1", "a0:2", "a1:0", "a1:1", "<eoa_o>", "<eos>"]

    v = Vocabulary(K, audio_levels=2, audio_codes=4)
    parts = cut_parts(LAYOUTS["style"], v, tokens, structure=tokens.flip(1))
    s = build_sequences(LAYOUTS["style"], v, parts, 1, txt, 3)
    assert _names(v, s.tokens[0]) == ["<bos>", "<task:style>", *T, "<bov_i>", "v5", "v6", "v3", "v4", "v1", "v2",
                                      "<eov_i>", "<bov_o>", *V, "<eov_o>", "<eos>"]
    with pytest.raises(ValueError, match="needs text"):
        build_sequences(LAYOUTS["t2v"], v, cut_parts(LAYOUTS["t2v"], v, tokens), 1, None, 3)


def test_structure_condition_stacks_flow_and_depth():
    flow = torch.zeros(1, 2, 2, 4, 4)
    flow[:, 0, :, 0, 0] = 3.0
    depth = torch.arange(32.0).reshape(1, 1, 2, 4, 4)
    x = StructureCondition()(flow=flow, depth=depth)
    assert x.shape == (1, 3, 2, 4, 4) and x[:, :2].abs().max() == 1 and x[:, 2].min() == -1 and x[:, 2].max() == 1


# ------------------------------------------------------------------------------------------------ prefix LM
def _lm(seed=0, vocab=40):
    torch.manual_seed(seed)
    return PrefixLM(PrefixLMConfig(vocab_size=vocab, width=32, depth=2, heads=4, text_dim=8)).eval()


def test_prefix_mask_bidirectional_prefix_causal_output():
    m = prefix_lm_mask(3, 6)
    assert m[0, :3].all() and not m[0, 3:].any()           # a prefix token sees every prefix token
    assert m[5].all() and not m[3, 4:].any()
    assert torch.equal(prefix_lm_mask(3, 6, n_q=2), m[4:])
    lm = _lm()
    tok = torch.randint(0, 40, (1, 8))
    P = 4
    base = lm(tok, P)
    # changing the last prefix token changes the first prefix position's logits (bidirectional)
    t2 = tok.clone()
    t2[0, P - 1] = (t2[0, P - 1] + 1) % 40
    assert not torch.allclose(lm(t2, P)[0, 0], base[0, 0])
    # changing output token j changes no logits before j
    for j in range(P, 8):
        t3 = tok.clone()
        t3[0, j] = (t3[0, j] + 7) % 40
        out = lm(t3, P)
        torch.testing.assert_close(out[0, :j], base[0, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(out[0, j], base[0, j])


def test_loss_only_on_outputs():
    m = _vp(text_dropout=0.0)
    torch.manual_seed(0)
    tokens = torch.randint(0, K, (2, 3, 1, 2))
    emb, ln = torch.randn(2, 3, 8), torch.tensor([3, 1])
    seq = m.sequences_for(LAYOUTS["i2v"], {}, tokens, (emb, ln), 2)
    loss, _ = m.lm_loss(seq, emb)
    logits = m.net(seq.tokens, seq.prefix_len, seq.key_valid, emb, seq.text_span[0])
    pos = [p for p in range(seq.length) if seq.loss_mask[p]]
    assert min(pos) >= seq.prefix_len  # no prefix position is a target
    manual = F.cross_entropy(logits[:, [p - 1 for p in pos]].reshape(-1, logits.shape[-1]), seq.tokens[:, pos].reshape(-1))
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-5)
    # a prefix token that is never a target still changes the loss only through the conditioning, and an
    # unused text slot (key_valid False) changes nothing at all
    emb2 = emb.clone()
    emb2[1, 2] += 5.0  # row 1 has 1 valid text token: slot 2 is padding
    torch.testing.assert_close(m.lm_loss(seq, emb2)[0], loss)


def test_kv_cache_decoding_equals_full_forward():
    lm = _lm(1)
    tok = torch.randint(0, 40, (2, 10))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 2] = False
    text = torch.randn(2, 2, 8)
    P = 4
    full = lm(tok, P, valid, text, 1)
    caches = [KVCache() for _ in lm.blocks]
    step = lm(tok[:, :P], P, valid, text, 1, caches, 0)
    torch.testing.assert_close(step, full[:, :P], rtol=1e-5, atol=1e-5)
    for p in range(P, 10):
        out = lm(tok[:, p:p + 1], P, valid, None, None, caches, p)
        torch.testing.assert_close(out[:, 0], full[:, p], rtol=1e-5, atol=1e-5)


def test_sampling_cache_and_no_cache_agree_and_force_the_first_frame():
    m = _vp(guidance_scale=2.0, text_dropout=0.1, top_k=5, top_p=0.9)
    cond = torch.randint(0, K, (2, 1, 1, 2))
    emb, ln = torch.randn(2, 3, 8), torch.tensor([3, 2])
    outs = [m.sample("i2v", 2, (3, 1, 2), batch={"text_emb": emb, "text_len": ln}, given_tokens=cond,
                     generator=torch.Generator().manual_seed(0), use_kv_cache=kv) for kv in (True, False)]
    assert torch.equal(outs[0]["sequence"], outs[1]["sequence"])
    assert torch.equal(outs[0]["tokens"][:, :1], cond)
    assert outs[0]["tokens"].max() < K
    lg = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(lg, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(lg, top_p=0.5)).tolist() == [[False, True, True, True]]


# ------------------------------------------------------------------------------------------------ AGD
def test_group_sampler_same_length_batches_zero_padding_and_weights():
    v = Vocabulary(K)
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, K, (64, 1, 2, 2), generator=rng)
    videos = torch.randint(0, K, (64, 3, 2, 2), generator=rng)
    groups = {"t2i": (images, 10), "t2v": (videos, 2), "fp": (videos, 2)}   # ~5x more images per batch
    weights = {"t2i": 0.5, "t2v": 0.3, "fp": 0.2}
    sampler = GroupSampler(weights, seed=0)
    counts = dict.fromkeys(weights, 0)
    for step in range(3000):
        name = sampler.group_at(step)
        counts[name] += 1
        if step < 30:
            data, bs = groups[name]
            idx = torch.randint(0, 64, (bs,), generator=rng)
            parts = cut_parts(LAYOUTS[name], v, data[idx])
            seq = build_sequences(LAYOUTS[name], v, parts, bs, torch.full((bs,), 3), 4)
            assert padding_fraction([seq.length] * bs) == 0.0 and seq.tokens.shape == (bs, seq.length)
    for name, w in weights.items():
        assert abs(counts[name] / 3000 - w) < 4 * np.sqrt(w * (1 - w) / 3000)
    assert sampler.group_at(1234) == GroupSampler(weights, seed=0).group_at(1234)  # pure function of the step
    assert padding_fraction([10, 5]) == 0.25


def test_config_errors_are_one_line():
    with pytest.raises(VideoPoetConfigError, match="unknown VideoPoet task 'x2y'"):
        _vp(tasks={"x2y": 1})
    with pytest.raises(VideoPoetConfigError, match="text_dropout > 0"):
        _vp(guidance_scale=3.0, text_dropout=0.0)


# ------------------------------------------------------------------------------------------------ overfit
def test_tiny_lm_overfits_and_reproduces_a_memorised_sequence():
    torch.manual_seed(0)
    m = _vp(width=64, depth=2, heads=4, tasks={"t2v": 1.0})
    tokens = torch.randint(0, K, (4, 2, 2, 2))
    emb = torch.randn(4, 3, 8)
    batch = {"tokens": tokens, "text_emb": emb, "text_len": torch.full((4,), 3)}
    opt = torch.optim.AdamW(m.net.parameters(), lr=3e-3)
    m.train()
    losses = []
    for step in range(150):
        loss = m.step_loss(batch, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    out = m.sample("t2v", 4, (2, 2, 2), batch=batch, temperature=0.0)
    assert torch.equal(out["tokens"], tokens)


# ------------------------------------------------------------------------------------------------ pixels
def test_predict_contract_i2v_forcing_and_long_video_with_a_causal_tokenizer():
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit2", filters=8, channel_multipliers=(1, 2), num_res_blocks=1,
                                   norm_groups=4, temporal_downsample=(True,)),
                         bottleneck=dict(kind="lfq", codebook_size=16, dim=None), num_frames=5, resolution=8,
                         inference_only=True).eval()
    m = _vp(tasks={"uncond": 1.0, "i2v": 1.0, "fp": 1.0}, num_frames=5, resolution=8, durations=[5],
            predict_task="i2v", extend_steps=3)
    m.attach_tokenizer(tok)
    video = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    out = m.predict_step({"video": video, "key": ["a", "b"]}, 0)
    assert set(out) >= {"videos", "keys", "captions", "cond_videos"} and out["keys"] == ["a", "b"]
    # 5 frames, then 3 rounds of "re-tokenise the last frame, predict the next 4": 17 >= 3x the trained length
    assert out["videos"].shape == (2, 3, 17, 8, 8) and out["videos"].abs().max() <= 1
    # I2V forces the first frame: its tokens in the sample are the condition's (causal: frame 0 encoded alone)
    first = m.encode_condition(video[:, :, :1], 1)
    torch.testing.assert_close(first, tok.encode(video[:, :, :1]))
    s = m.sample("i2v", 2, (3, 4, 4), given_tokens=first, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s["tokens"][:, :1], first)


def test_duration_res_and_source_tokens_reach_training_and_sampling_sequences():
    """§2.4: the duration token names the clip's length (an entry of ``durations``), read from the token grid through
    the tokenizer (causal: 1 + f·(t − 1) frames) or from ``batch["num_frames"]``; ``<res>`` marks a non-square clip;
    ``<source:i>`` comes from ``batch["source"]``. Sampling writes the same token training saw."""
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit2", filters=8, channel_multipliers=(1, 2), num_res_blocks=1,
                                   norm_groups=4, temporal_downsample=(True,)),
                         bottleneck=dict(kind="lfq", codebook_size=16, dim=None), num_frames=5, resolution=8,
                         inference_only=True).eval()
    m = _vp(tasks={"uncond": 1.0, "fp": 1.0}, num_frames=5, resolution=8, durations=[9, 5])
    v = m.vocab

    def names(batch, tokens, layout="uncond"):
        seq = m.sequences_for(LAYOUTS[layout], batch, tokens, (None, None), tokens.shape[0])
        return [v.names[t] for t in seq.tokens[0].tolist() if t < 256]

    grid = torch.randint(0, K, (2, 3, 4, 4))  # 3 latent frames of a causal 2x tokenizer: 5 frames
    with pytest.warns(UserWarning, match="durations"):
        assert "<dur:1>" not in names({}, grid)  # no tokenizer, no num_frames: unknown length, said once
    assert names({"num_frames": torch.tensor([5, 5])}, grid) == ["<bos>", "<task:video>", "<dur:1>", "<bov_o>", "<eov_o>", "<eos>"]
    m.attach_tokenizer(tok)
    assert names({}, grid) == ["<bos>", "<task:video>", "<dur:1>", "<bov_o>", "<eov_o>", "<eos>"]
    assert names({}, torch.randint(0, K, (2, 5, 4, 4)))[2] == "<dur:0>"  # 1 + 2·4 = 9 frames
    assert names({}, grid, "fp")[-4] == "<dur:1>"  # FP: after the given frames, before the output
    assert names({"source": 3}, torch.randint(0, K, (2, 3, 4, 6)))[2:5] == ["<source:3>", "<res:128x224>", "<dur:1>"]
    with pytest.raises(ValueError, match=r"clips of 7 frames, but model.durations is \[9, 5\]"):
        names({}, torch.randint(0, K, (2, 4, 4, 4)))
    with pytest.raises(ValueError, match="one value per batch"):
        names({"num_frames": torch.tensor([5, 9])}, grid)
    with pytest.raises(ValueError, match="data-source tag"):
        names({"source": 99}, grid)
    s = m.sample("uncond", 2, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    assert v.special("<dur:1>") in s["sequence"][0].tolist()
    # a still (one latent frame) has no duration
    assert "<dur:0>" not in names({}, torch.randint(0, K, (2, 1, 4, 4))) and "<dur:1>" not in names({}, torch.randint(0, K, (2, 1, 4, 4)))
