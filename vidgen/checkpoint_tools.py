"""Checkpoint tools: ``vidgen consolidate`` and ``vidgen export``.

``vidgen consolidate CKPT_DIR OUT.ckpt``
    Turns the sharded DCP directory that ``ModelParallelStrategy``/``FSDP2Strategy`` saves into one Lightning
    checkpoint file: ``state_dict`` (model + ``_ema.*`` EMA entries, full tensors), ``optimizer_states`` (keyed by
    parameter index like ``optimizer.state_dict()``, so DDP and single-device runs resume from it; the
    ModelParallel strategy re-keys them by name itself) and everything else from ``meta.pt`` (loops, callbacks,
    hyper-parameters). Lightning's own ``consolidate_checkpoint`` expects FSDP1's ``model`` key and fails on these.

``vidgen export [--ema] CKPT OUT [--format safetensors|torch] [--dtype fp32|bf16|fp16]``
    Writes the model weights alone, under the model's own parameter names, as one safetensors/torch file;
    with ``--ema`` the EMA weights (``vidgen.callbacks.ema.ema_state_dict``; raw weights with a warning when the
    checkpoint has none). ``CKPT`` is a checkpoint file or a sharded directory (read without a process group;
    only the model entries are loaded). The format follows OUT's suffix unless ``--format`` is given.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from vidgen.lightning_modules.nn.checkpoint import atomic_write, safe_load

__all__ = [
    "consolidate_main",
    "export_main",
    "consolidate_checkpoint",
    "load_model_state_dict",
    "export_state_dict",
    "is_sharded_checkpoint",
]

META_FILENAME = "meta.pt"  # written next to the shards by Lightning's ModelParallelStrategy (rank 0)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_sharded_checkpoint(path: os.PathLike | str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


def _require_sharded(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if not is_sharded_checkpoint(path):
        raise ValueError(
            f"{path} is not a sharded (DCP) checkpoint directory (no .metadata file). "
            "A single-file checkpoint needs no consolidation."
        )


def consolidate_checkpoint(ckpt_dir: os.PathLike | str, out: os.PathLike | str) -> dict[str, Any]:
    """Write the single-file Lightning checkpoint of sharded ``ckpt_dir`` to ``out``; returns it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt_dir, out = Path(ckpt_dir), Path(out)
    _require_sharded(ckpt_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp_to_torch_save(str(ckpt_dir), tmp)  # all shards, full tensors, original nesting
        content = safe_load(tmp, mmap=True)
        meta_path = ckpt_dir / META_FILENAME
        checkpoint: dict[str, Any] = safe_load(meta_path) if meta_path.is_file() else {}
        checkpoint["state_dict"] = content.pop("state_dict", {})
        opt_keys = sorted((k for k in content if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
        if opt_keys:
            # kept keyed by parameter name (as DCP saved them): torch's Optimizer.load_state_dict maps saved to
            # current parameters by position within param_groups, whatever the keys, so DDP/single-device runs
            # resume from it; ModelParallelStrategy matches them by name. (Index keys would be re-keyed by
            # Lightning's ModelParallel loader against model.parameters(), which is wrong when the optimizer
            # skips frozen parameters.)
            checkpoint["optimizer_states"] = [content.pop(k) for k in opt_keys]
        checkpoint.update(content)  # anything else saved in the shards
        atomic_write(out, lambda f: torch.save(checkpoint, f))
    finally:
        Path(tmp).unlink(missing_ok=True)
    return checkpoint


def _load_sharded_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` tensors of a DCP directory, full-size, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    prefix = "state_dict."
    template: dict[str, torch.Tensor] = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            template[key[len(prefix) :]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not template:
        raise ValueError(f"{ckpt_dir} holds no model weights ('state_dict.*' entries).")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": intended
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({"state_dict": template}, checkpoint_id=str(ckpt_dir), no_dist=True)
    return template


def load_model_state_dict(path: os.PathLike | str) -> dict[str, Any]:
    """The full ``state_dict`` (model + ``_ema.*``) of a checkpoint file or sharded directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Checkpoint {p} does not exist.")
    if p.is_dir():
        _require_sharded(p)
        return _load_sharded_model_state(p)
    try:
        checkpoint = safe_load(p, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        checkpoint = safe_load(p)
    return checkpoint["state_dict"] if isinstance(checkpoint, dict) and "state_dict" in checkpoint else checkpoint


def export_state_dict(
    ckpt: os.PathLike | str,
    out: os.PathLike | str,
    ema: bool = False,
    fmt: Optional[str] = None,
    dtype: Optional[str] = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Write the (EMA or raw) model weights of ``ckpt`` to ``out``; returns them and ``"ema"``/``"raw"``."""
    from vidgen.callbacks.ema import EMA_PREFIX, ema_state_dict, raw_state_dict

    out = Path(out)
    sd = load_model_state_dict(ckpt)
    weights = ema_state_dict(sd) if ema else raw_state_dict(sd)  # warns when --ema finds no EMA
    kind = "ema" if ema and any(k.startswith(EMA_PREFIX) for k in sd) else "raw"
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    dropped = sorted(set(weights) - set(tensors))
    if dropped:
        print(f"export: skipping non-tensor entries {dropped[:5]}", file=sys.stderr)
    cast = _DTYPES[dtype] if dtype else None
    tensors = {
        k: (v.to(cast) if cast is not None and v.is_floating_point() else v).detach().contiguous().clone()
        for k, v in tensors.items()
    }
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "torch")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save

        blob = save(tensors, metadata={"format": "pt", "weights": kind})
        atomic_write(out, lambda f: f.write(blob))
    elif fmt == "torch":
        atomic_write(out, lambda f: torch.save(tensors, f))
    else:
        raise ValueError(f"Unknown export format {fmt!r}; use 'safetensors' or 'torch'.")
    return tensors, kind


def consolidate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vidgen consolidate", description="Turn a sharded (DCP) checkpoint directory into a single .ckpt file."
    )
    parser.add_argument("ckpt_dir", help="sharded checkpoint directory (saved by ModelParallelStrategy/FSDP2Strategy)")
    parser.add_argument("out", help="output checkpoint file, e.g. last.ckpt")
    args = parser.parse_args(argv)
    checkpoint = consolidate_checkpoint(args.ckpt_dir, args.out)
    n_ema = sum(k.startswith("_ema.") for k in checkpoint["state_dict"])
    print(
        f"wrote {args.out}: {len(checkpoint['state_dict']) - n_ema} model entries, {n_ema} EMA entries, "
        f"{len(checkpoint.get('optimizer_states', []))} optimizer state(s)"
    )
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vidgen export", description="Export model weights (optionally the EMA ones) from a checkpoint."
    )
    parser.add_argument("ckpt", help="checkpoint file or sharded checkpoint directory")
    parser.add_argument("out", help="output file (.safetensors -> safetensors, otherwise torch.save)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (raw ones + warning if absent)")
    parser.add_argument("--format", choices=["safetensors", "torch"], default=None, help="default: from OUT's suffix")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast floating tensors")
    args = parser.parse_args(argv)
    tensors, kind = export_state_dict(args.ckpt, args.out, ema=args.ema, fmt=args.format, dtype=args.dtype)
    n = sum(v.numel() for v in tensors.values())
    note = " -- the checkpoint has no EMA" if args.ema and kind == "raw" else ""
    print(f"wrote {args.out}: {len(tensors)} tensors, {n:,} values ({kind.upper() if kind == 'ema' else kind} weights{note})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_main(sys.argv[1:]))
