"""Checkpoints are never half-written (brief): every writer (Lightning saves through AtomicCheckpointIO, `vidgen export`,
`vidgen consolidate`) goes through ``nn.checkpoint.atomic_write``: a failing write leaves the old file and no
temporary behind."""

import os

import pytest
import torch

from vidgen.lightning_modules.nn.checkpoint import TMP_MARK, atomic_write, safe_load


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda f: torch.save({"step": 1}, f))
    assert safe_load(path) == {"step": 1}

    def half(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # a kill (SIGINT) in the middle of the save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert safe_load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    atomic_write(path, lambda f: torch.save({"step": 2}, f))
    assert safe_load(path) == {"step": 2} and not any(TMP_MARK in p for p in os.listdir(tmp_path))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_writes_through_it(tmp_path, monkeypatch, suffix):
    from vidgen import checkpoint_tools

    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0), "_ema.w": torch.ones(4)}}, ckpt)
    seen = []
    real = checkpoint_tools.atomic_write
    monkeypatch.setattr(checkpoint_tools, "atomic_write", lambda p, w: (seen.append(str(p)), real(p, w)))
    out = tmp_path / f"w{suffix}"
    tensors, kind = checkpoint_tools.export_state_dict(ckpt, out, ema=True)
    assert seen == [str(out)] and kind == "ema"
    assert torch.equal(safe_load(out)["w"], torch.ones(4))
