"""Untrusted files (issue 9 §7): every checkpoint read is weights-only with the explicit allow-list, so a pickle that
would run code is refused with a message naming the class; the demo sets ``weights_only`` in its own saves."""

import ast
import pathlib

import pytest
import torch

from vidgen.lightning_modules.nn.checkpoint import UnsafeCheckpointError


def run_code(marker: str):
    open(marker, "w").close()


class Payload:
    """Unpickling this calls ``run_code``: the stand-in for arbitrary code in an untrusted checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (run_code, (self.marker,))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2), "_ema.w": torch.ones(2)},
                "hyper_parameters": {"arch": Payload(str(marker))}}, path)
    return path, marker


def test_checkpoint_readers_refuse_code(evil):
    from vidgen.callbacks.ema import checkpoint_ema_names
    from vidgen.checkpoint_tools import load_model_state_dict
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer
    from vidgen.runtime import AtomicCheckpointIO

    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="refused to unpickle .*run_code.*ALLOWED_GLOBALS"):
        load_model_state_dict(path)  # vidgen export / consolidate
    with pytest.raises(UnsafeCheckpointError):
        VideoTokenizer.load_frozen(str(path))  # a frozen tokenizer for stage 2 / Latte's VAE
    with pytest.warns(UserWarning, match="could not inspect"):
        assert checkpoint_ema_names(path) is None  # the EMA callback's look at a checkpoint to resume
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        AtomicCheckpointIO().load_checkpoint(path)  # what every vidgen fit --ckpt_path reads through
    assert not marker.exists()


def test_pretrained_network_readers_go_through_the_shared_reader(evil, tmp_path):
    """The perceptual nets, the I3D file and CLIP weights are read by ``nn.checkpoint`` (one allow-list, one
    message), in the layouts users have: a plain state dict or one under ``state_dict``."""
    import torchvision

    from vidgen.lightning_modules.nn.i3d import load_i3d
    from vidgen.lightning_modules.nn.perceptual import build_classifier
    from vidgen.lightning_modules.nn.text_encoders import _clip_state_dict

    path, marker = evil
    for read in (lambda p: build_classifier("resnet18", str(p)), lambda p: load_i3d(str(p), kind="reference"),
                 _clip_state_dict):
        with pytest.raises((UnsafeCheckpointError, ValueError), match="refused to unpickle .*run_code"):
            read(path)
    assert not marker.exists()
    sd = torchvision.models.resnet18(weights=None).state_dict()
    for name, blob in (("plain.pth", sd), ("wrapped.pth", {"state_dict": sd})):
        torch.save(blob, tmp_path / name)
        net = build_classifier("resnet18", str(tmp_path / name))
        assert torch.equal(net.state_dict()["fc.weight"], sd["fc.weight"])


def test_demo_saves_set_weights_only():
    demos = pathlib.Path(__file__).resolve().parent.parent / "vidgen" / "demos"
    calls = []
    for f in sorted(demos.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("save_checkpoint", "load"):
                if getattr(node.func, "attr") == "load" and getattr(node.func.value, "id", None) != "torch":
                    continue
                calls.append((f.name, node.lineno, any(k.arg == "weights_only" for k in node.keywords)))
    # the stages save through vidgen.demos.common.stage_trainer (the CLI's LastCheckpoint, tests/test_demo_run_layout.py);
    # any direct save or torch.load left in a stage must still say weights_only
    assert all(ok for _, _, ok in calls), [c for c in calls if not c[2]]
