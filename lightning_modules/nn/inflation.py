"""2D→3D inflation of a per-frame image model into the video model of the same layout (spec magvit.md §1.11, §5.2).

Works on plain ``name -> tensor`` mappings, so one call covers generator, discriminator and any EMA copy that uses
the same names:

- same shape (norms, biases, codebook, Dense layers): copied;
- a 2D kernel ``[co, ci, kh, kw]`` (or ``[co, ci, 1, kh, kw]``) meeting a 3D kernel ``[co, ci, kt, kh, kw]``:
  ``central`` zeroes the 3D kernel and puts the 2D kernel in slice kt//2 — or in the **last** slice kt−1 for causal
  kernels (the slice aligned with the current frame); ``average`` puts kernel/kt in every slice;
- a 3D layer with r× the output channels of its 2D counterpart (depth-to-space upsampling with the time factor
  outermost): the 2D kernel/bias is tiled r times over the output channels, then inflated as above.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

MODES = ("central", "average")


def inflate_kernel(w2: Tensor, kt: int, mode: str = "central", causal: bool = False) -> Tensor:
    """[co, ci, kh, kw] or [co, ci, 1, kh, kw] → [co, ci, kt, kh, kw]."""
    if mode not in MODES:
        raise ValueError(f"inflation mode must be one of {MODES}, got {mode!r}")
    if w2.dim() == 5:
        if w2.shape[2] != 1:
            raise ValueError(f"a 2D source kernel must have temporal size 1, got shape {tuple(w2.shape)}")
        w2 = w2[:, :, 0]
    if mode == "average":
        return w2[:, :, None].repeat(1, 1, kt, 1, 1) / kt
    w3 = w2.new_zeros(w2.shape[0], w2.shape[1], kt, *w2.shape[2:])
    w3[:, :, kt - 1 if causal else kt // 2] = w2
    return w3


def _tile_out(t: Tensor, co: int, key: str) -> Tensor:
    if co % t.shape[0]:
        raise ValueError(f"cannot inflate {key!r}: {t.shape[0]} output channels do not divide {co}")
    return torch.cat([t] * (co // t.shape[0]), dim=0)


def inflate_tensor(key: str, src: Tensor, dst: Tensor, mode: str, causal: bool) -> tuple[Tensor, str]:
    """One entry: returns (value shaped like ``dst``, what was done: copied | inflated | tiled)."""
    if src.shape == dst.shape:
        return src.clone(), "copied"
    how = "inflated"
    if src.dim() >= 1 and dst.dim() == src.dim() and dst.shape[1:] == src.shape[1:] and dst.shape[0] != src.shape[0]:
        return _tile_out(src, dst.shape[0], key), "tiled"
    if dst.dim() == 5 and src.dim() in (4, 5):
        if src.shape[0] != dst.shape[0]:
            src, how = _tile_out(src, dst.shape[0], key), "tiled"
        w3 = inflate_kernel(src, dst.shape[2], mode, causal)
        if w3.shape == dst.shape:
            return w3, how
    raise ValueError(f"cannot inflate {key!r}: 2D shape {tuple(src.shape)} does not match 3D shape {tuple(dst.shape)}; "
                     "the 2D model must have the same layout (filters, multipliers, blocks) as the 3D model")


def inflate_state_dict(src: Mapping[str, Tensor], template: Mapping[str, Tensor], mode: str = "central",
                       causal_keys: Iterable[str] = ()) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Inflate ``src`` (2D names → tensors) onto ``template`` (3D state).  Entries missing from ``src`` keep the
    template value.  Returns the new state and a report {copied, inflated, tiled, kept, unused}."""
    causal_keys = set(causal_keys)
    out, report = {}, {"copied": [], "inflated": [], "tiled": [], "kept": [], "unused": []}
    for key, dst in template.items():
        if key not in src:
            out[key] = dst
            report["kept"].append(key)
            continue
        val, how = inflate_tensor(key, src[key].to(dst.dtype), dst, mode, key in causal_keys)
        out[key] = val
        report[how].append(key)
    report["unused"] = [k for k in src if k not in template]
    return out, report
