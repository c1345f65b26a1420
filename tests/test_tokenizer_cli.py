"""`vidgen tokenize`: token / latent shards with passthrough and index.json; early errors; configs validate."""

import glob
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import yaml

from shardgen import write_shards

from vidgen.lightning_modules.video_tokenizer import VideoTokenizer
from vidgen.tokenize import main as tokenize_main

TINY = dict(filters=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(tok, path):
    torch.save({"state_dict": tok.state_dict(), "hyper_parameters": dict(tok.hparams)}, path)
    return str(path)


def _read(out_dir):
    samples = {}
    for url in sorted(glob.glob(os.path.join(out_dir, "*.tar"))):
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@pytest.mark.filterwarnings("ignore:Checkpoint has no EMA")
def test_tokenize_writes_token_shards(tmp_path):
    write_shards(str(tmp_path / "in"), n_shards=2, per_shard=3, frames=12)
    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit2", temporal_downsample=(True, True), **TINY),
                         bottleneck=dict(kind="lfq", codebook_size=2 ** 6, dim=None),
                         discriminator=dict(enabled=False), loss=dict(perceptual_weight=0), num_frames=9,
                         resolution=16)
    ckpt = _save(tok, tmp_path / "tok.ckpt")
    out = tmp_path / "tokens"
    rc = tokenize_main(["--checkpoint", ckpt, "--shards", str(tmp_path / "in"), "--out", str(out),
                        "--batch-size", "4", "--num-workers", "0", "--samples-per-shard", "4", "--device", "cpu"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "vidgen-shards/1" and index["num_samples"] == 6 and len(index["shards"]) == 2
    assert index["tokenizer"]["shape"] == [3, 4, 4] and index["tokenizer"]["codebook_size"] == 64
    samples = _read(out)
    assert sorted(samples) == [f"{k:06d}" for k in range(6)]
    s = samples["000004"]
    tokens = np.load(io.BytesIO(s["npy"]))
    assert tokens.shape == (3, 4, 4) and tokens.dtype == np.int16 and 0 <= tokens.min() and tokens.max() < 64
    assert s["txt"] == b"sample 4"
    meta = json.loads(s["json"])
    assert meta["label"] == 4 and meta["fps"] == 8 and meta["tokenizer"]["kind"] == "tokens"
    # same tokens as encoding the clip the datamodule's evaluation decode gives
    from vidgen.datamodules.decode import ClipSpec, decode_sample, to_float

    raw = _read(tmp_path / "in")["000004"]
    clip = decode_sample("000004", raw, ClipSpec(num_frames=9, height=16, width=16), None)["video"]
    frozen = VideoTokenizer.load_frozen(ckpt)
    np.testing.assert_array_equal(frozen.encode(to_float(clip[None]))[0].numpy(), tokens)
    # existing output is not silently replaced; a bad clip length is a config error before any work
    assert tokenize_main(["--checkpoint", ckpt, "--shards", str(tmp_path / "in"), "--out", str(out)]) == 2
    assert tokenize_main(["--checkpoint", ckpt, "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "x"),
                          "--num-frames", "8"]) == 2


@pytest.mark.filterwarnings("ignore:Checkpoint has no EMA")
def test_tokenize_writes_latents_for_kl(tmp_path):
    write_shards(str(tmp_path / "in"), n_shards=1, per_shard=2, frames=12)
    torch.manual_seed(0)
    tok = VideoTokenizer(arch=dict(kind="magvit", dims=2, temporal_downsample=(False, False), **TINY),
                         bottleneck=dict(kind="kl", dim=4), discriminator=dict(enabled=False),
                         loss=dict(perceptual_weight=0), num_frames=3, resolution=16)
    ckpt = _save(tok, tmp_path / "vae.ckpt")
    out = tmp_path / "lat"
    assert tokenize_main(["--checkpoint", ckpt, "--shards", str(tmp_path / "in"), "--out", str(out),
                          "--num-workers", "0", "--float16", "--device", "cpu"]) == 0
    lat = np.load(io.BytesIO(_read(out)["000001"]["npy"]))
    assert lat.shape == (4, 3, 4, 4) and lat.dtype == np.float16


def _configs():
    pats = ["configs/magvit/tokenizer_*.yaml", "configs/videopoet/tokenizer_lfq*.yaml",
            "configs/videopoet/tokenizer_seed_voken*.yaml", "configs/latte/vae*.yaml", "configs/tora/motion_vae*.yaml"]
    return sorted(p for pat in pats for p in glob.glob(os.path.join(ROOT, pat)))


@pytest.mark.parametrize("path", _configs(), ids=os.path.basename)
def test_configs_validate_and_tiny_ones_build(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert cfg["model"]["class_path"] == "vidgen.lightning_modules.video_tokenizer.VideoTokenizer"
    for key in ("num_frames", "resolution"):  # linked data -> model by the CLI
        assert model.get(key, data[key]) == data[key]
    args = {**model, "num_frames": data["num_frames"], "resolution": data["resolution"]}
    if not path.endswith("_tiny.yaml") and (model.get("loss") or {}).get("perceptual_weight", 0.1) > 0:
        # a full recipe that asks for the perceptual term names its network (null would train without it)
        assert (model.get("loss") or {}).get("perceptual_weights"), f"{path}: perceptual_weight > 0 without weights"
    if (model.get("loss") or {}).get("perceptual_weights"):  # the full recipes name a local ImageNet net (#11 §8)
        from vidgen.lightning_modules.nn.conv3d import ConfigError

        assert model["loss"]["perceptual_weights"].startswith("pretrained/")
        with pytest.raises(ConfigError, match="perceptual_weights"):  # not downloaded here
            VideoTokenizer.validate_config(args)
        args["loss"] = {**model["loss"], "perceptual_weights": None}
    if model.get("init_from"):  # a pretrained tokenizer the user downloads (tokenizer_seed_voken.yaml)
        args["init_from"] = None
    VideoTokenizer.validate_config(args)
    if path.endswith("_tiny.yaml"):
        assert "demo" in str(data.get("train_shards") or data.get("sources"))
        with pytest.warns(UserWarning, match="perceptual") if model["loss"].get("perceptual_weight", 0.1) else \
                _no_warning():
            tok = VideoTokenizer(**args)
        v = torch.zeros(1, 3, data["num_frames"], data["resolution"], data["resolution"])
        with torch.no_grad():
            assert tok(v).shape == v.shape
            if tok.discriminator is not None:
                assert tok.discriminator(v).shape[0] >= 1


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
