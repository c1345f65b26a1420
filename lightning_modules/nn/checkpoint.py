"""Checkpoint reading and the key report, written once for every model's ``load_pretrained``.

* :func:`safe_load` -- ``torch.load(weights_only=True)`` (never arbitrary unpickling) with a short allow-list of
  classes that official checkpoints are known to pickle next to their weights (``argparse.Namespace``); any other
  class is refused with a message that names it and says how to allow it knowingly. ``.safetensors`` files load
  with safetensors.
* :func:`read_state_dict` -- the network weights inside a file: ``ema`` preferred over ``model``, a Lightning
  checkpoint's ``state_dict`` (EMA weights when present), or a raw state dict; non-tensors dropped.
* :class:`KeyReport` -- loaded / missing / unexpected / shape-mismatched keys, as a table.
* :func:`atomic_write` -- the one way a checkpoint or weights file is written: never half-written.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import secrets
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

#: ``<name>.tmp-<pid>-<random>``: a file being written by :func:`atomic_write`
TMP_MARK = ".tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into ``<path>.tmp-<pid>-<random>`` in ``path``'s folder, fsync, rename it over ``path``, fsync the
    folder: a kill or a crash at any point leaves the old file or the new one, never a broken one, and the rename
    survives a power loss. The file gets the mode ``open(path, "wb")`` would give it (0666 minus the umask)."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{os.path.basename(path)}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open(path, "wb")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # the rename itself is durable once the folder's entry is on disk
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or filesystem without directory handles
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def default_cache_dir() -> Path:
    """``$VIDGEN_CACHE`` or ``~/.cache/vidgen``: converted weights (``vidgen convert-i3d``) and cached statistics."""
    return Path(os.environ.get("VIDGEN_CACHE") or Path.home() / ".cache" / "vidgen")


# Classes that known official checkpoints pickle beside their tensors (Latte, DiT and Open-Sora files store their
# argparse arguments). Extend knowingly, for files you trust: ALLOWED_GLOBALS.append(MyClass).
ALLOWED_GLOBALS: list[type] = [argparse.Namespace]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a class that weights-only loading does not allow."""


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", extra_globals: Sequence = (),
              mmap: bool = False):
    """Load ``path`` without arbitrary code execution (see the module docstring); ``mmap``: map tensors lazily."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (weights load from local paths only)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    try:
        with torch.serialization.safe_globals([*ALLOWED_GLOBALS, *extra_globals]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "an object"
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle {what} (checkpoints load with weights_only=True). If you trust this file, "
            f"allow the class knowingly: `vidgen.lightning_modules.nn.checkpoint.ALLOWED_GLOBALS.append({what.rsplit('.', 1)[-1]})` "
            "or `torch.serialization.add_safe_globals([...])`, then load again.") from None


EMA_ATTR = "_ema"
#: state_dict prefix of the EMA weights (vidgen.callbacks.ema.EMA): ``EMA_PREFIX + <parameter name>``
EMA_PREFIX = EMA_ATTR + "."


def _model_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(sd, Mapping):
        raise TypeError("Expected a Lightning checkpoint dict (with 'state_dict') or a state dict.")
    return sd


def raw_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model's own weights from a (consolidated) checkpoint or state dict, without the EMA entries."""
    return {k: v for k, v in _model_state(checkpoint).items() if not k.startswith(EMA_PREFIX)}


def ema_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model's state dict with every averaged parameter replaced by its EMA, under the model's own names.

    ``checkpoint``: a loaded (consolidated) Lightning checkpoint or its ``state_dict``. Entries without an EMA
    (frozen parameters, buffers) are the raw ones. Without any EMA entry, returns the raw weights and warns.
    """
    sd = _model_state(checkpoint)
    ema = {k[len(EMA_PREFIX) :]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
    raw = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    if not ema:
        warnings.warn("Checkpoint has no EMA weights (no '_ema.*' keys); returning the raw weights.", stacklevel=2)
        return raw
    orphans = sorted(set(ema) - set(raw))
    if orphans:
        warnings.warn(f"EMA entries without a matching model entry are dropped: {orphans[:5]}", stacklevel=2)
    return {k: ema.get(k, v) for k, v in raw.items()}




def read_state_dict(source: str | os.PathLike | Mapping, prefer: Sequence[str] = ("ema", "model")) -> dict[str, Tensor]:
    """The network weights in ``source`` (a path or an already loaded object); see the module docstring.

    A Lightning checkpoint's ``state_dict`` comes back with its own key names (``model.`` etc. kept); callers strip
    the prefix they expect. A ``module.`` prefix (DDP-saved files) is removed."""
    obj = safe_load(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
    sd = None
    for key in prefer:
        if isinstance(obj.get(key), Mapping):
            sd = dict(obj[key])
            break
    if sd is None and isinstance(obj.get("state_dict"), Mapping):  # a Lightning checkpoint
        sd = lightning_weights(obj)
    if sd is None:
        sd = dict(obj)
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def lightning_weights(checkpoint: Mapping) -> dict[str, Tensor]:
    """A Lightning checkpoint's weights, EMA ones when the checkpoint has them."""
    return dict(ema_state_dict(checkpoint))


def _group(keys: list[str]) -> str:
    counts = Counter(re.sub(r"\.\d+(\.|$)", r".*\1", k).split(".")[0] for k in keys)
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "-"


@dataclass
class KeyReport:
    """What a checkpoint load did: loaded keys, missing (kept at init), unexpected, and shape mismatches (dropped)."""

    source: str = ""
    kind: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[tuple[str, tuple]] = field(default_factory=list)
    unexpected: list[tuple[str, tuple]] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    model: str = "model"

    @classmethod
    def compare(cls, ckpt: Mapping[str, Tensor], own: Mapping[str, Tensor], source: str = "", kind: str = "",
                model: str = "model") -> KeyReport:
        r = cls(source=source, kind=kind, model=model)
        for k, v in own.items():
            if k not in ckpt:
                r.missing.append((k, tuple(v.shape)))
            elif tuple(ckpt[k].shape) != tuple(v.shape):
                r.mismatched.append((k, tuple(ckpt[k].shape), tuple(v.shape)))
            else:
                r.loaded.append(k)
        r.unexpected = [(k, tuple(v.shape)) for k, v in ckpt.items() if k not in own]
        return r

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def table(self) -> str:
        rows = [("status", "key", "checkpoint", "model")]
        rows.append(("loaded", f"{len(self.loaded)} tensors ({_group(self.loaded)})", "", ""))
        rows += [("missing (init kept)", k, "-", list(s)) for k, s in self.missing]
        rows += [("shape differs (dropped)", k, list(a), list(b)) for k, a, b in self.mismatched]
        rows += [("unexpected (ignored)", k, list(s), "-") for k, s in self.unexpected]
        widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
        lines = [f"{self.model} <- {self.source} ({self.kind})"]
        for i, r in enumerate(rows):
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def keep_out_of_checkpoints(module, prefixes: Sequence[str]) -> None:
    """Leave the submodules named by ``prefixes`` (e.g. ``("vae.", "text_encoder.")``: frozen nets loaded from a
    path given in config) out of ``module``'s state dict, and do not report them missing when loading one."""
    prefixes = tuple(prefixes)

    def _save_hook(mod, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key in [k for k in state_dict if any(k.startswith(prefix + p) for p in prefixes)]:
            del state_dict[key]

    def _load_hook(mod, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not any(k.startswith(p) or f".{p}" in k for p in prefixes)]

    module.register_state_dict_post_hook(_save_hook)
    module.register_load_state_dict_post_hook(_load_hook)

