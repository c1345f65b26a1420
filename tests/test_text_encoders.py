"""Shared text-encoder interface: open_clip (tiny random tower, local checkpoint), HF from a local dir, offline MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vidgen.lightning_modules.nn.text_encoders import (
    HFTextEncoder,
    OpenCLIPTextEncoder,
    TextEncoding,
    build_text_encoder,
    minilm_model_dir,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(kind="minilm")


def test_open_clip_tiny_tower_offline_tokenizer_and_outputs():
    import open_clip

    assert (Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").is_file()  # the BPE ships with open_clip
    enc = build_text_encoder(kind="open_clip")
    out = enc(["a red square moving left", "hi", ""])
    assert isinstance(out, TextEncoding) and isinstance(out, tuple)
    tokens, mask, pooled = out
    assert tokens.shape == (3, 77, enc.token_dim) and mask.shape == (3, 77) and pooled.shape == (3, enc.pooled_dim)
    # mask covers <start> ... <end>: "hi" is 1 BPE token, "" none
    assert mask.sum(1).tolist()[1:] == [3, 2] and mask[:, 0].all()
    # seeded random tower: the same weights on every construction; frozen and in eval mode
    again = build_text_encoder(kind="open_clip")
    torch.testing.assert_close(again(["hi"]).pooled, enc(["hi"]).pooled)
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert not enc(["x"]).pooled.requires_grad
    assert enc.from_file is False


def test_open_clip_loads_text_weights_from_a_local_checkpoint(tmp_path, monkeypatch):
    import open_clip

    tiny = {"width": 32, "heads": 2, "layers": 2, "context_length": 77, "vocab_size": 49408}
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: {"embed_dim": 16, "text_cfg": dict(tiny)})
    source = OpenCLIPTextEncoder(tiny={"width": 32, "heads": 2, "layers": 2, "embed_dim": 16, "seed": 7})
    sd = {k: v for k, v in source.tower.state_dict().items()}
    sd["visual.conv1.weight"] = torch.zeros(1)  # a full CLIP file: the image tower is ignored
    sd["logit_scale"] = torch.ones(())
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    enc = build_text_encoder(kind="open_clip", model_name="tiny-test", checkpoint=str(path))
    assert enc.from_file
    torch.testing.assert_close(enc(["a cat"]).pooled, source(["a cat"]).pooled)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        OpenCLIPTextEncoder("ViT-B-32", checkpoint=str(tmp_path / "missing.pt"))


def test_minilm_offline_similar_sentences_are_closer(minilm):
    tokens, mask, pooled = minilm(["a red square moving left", "a red box moving to the left", "stock prices fell today"])
    assert tokens.shape[-1] == pooled.shape[-1] == minilm.pooled_dim == 384
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))  # Normalize module of sentence-transformers
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    assert mask.dtype == torch.bool and mask[0].sum() < mask.shape[1]
    # pooled = mean of the token features over the mask, L2-normalised
    mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(mean, dim=-1), rtol=1e-5, atol=1e-5)


def test_hf_encoder_from_a_local_directory(minilm):
    path = str(minilm_model_dir())
    enc = build_text_encoder(kind="hf", path=path, max_length=16, pooling="cls")
    assert isinstance(enc, HFTextEncoder) and enc.from_file
    tokens, mask, pooled = enc(["a cat"])
    assert tokens.shape == (1, 16, 384) and mask[0].sum() == 4  # [CLS] a cat [SEP]
    torch.testing.assert_close(pooled, tokens[:, 0])
    torch.testing.assert_close(tokens[:, :4], minilm(["a cat"]).tokens[:, :4], rtol=1e-4, atol=1e-4)


def test_config_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        build_text_encoder(kind="t5")
    with pytest.raises(ValueError, match="local transformers directory"):
        build_text_encoder(kind="hf")
    with pytest.raises(FileNotFoundError):
        build_text_encoder(kind="hf", path=os.path.join("no", "such", "dir"))
    with pytest.raises(ValueError, match="unknown text_encoder keys"):
        build_text_encoder({"kind": "minilm", "bogus": 1})


def test_hf_encoder_from_a_diffusers_pipeline_layout(tmp_path, minilm):
    """``<pipeline>/text_encoder`` holds the weights, ``<pipeline>/tokenizer`` the tokenizer (Latte-1, SD)."""
    src = minilm_model_dir()
    for sub, names in (("text_encoder", ("config.json", "model.safetensors")),
                       ("tokenizer", ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"))):
        (tmp_path / sub).mkdir()
        for name in names:
            (tmp_path / sub / name).symlink_to(src / name)
    enc = build_text_encoder(kind="hf", path=str(tmp_path / "text_encoder"), max_length=16)
    torch.testing.assert_close(enc(["a cat"]).tokens[:, :4], minilm(["a cat"]).tokens[:, :4], rtol=1e-4, atol=1e-4)
