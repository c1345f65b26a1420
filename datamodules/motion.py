"""Motion members written by ``vidgen trajectories`` (Tora, spec latte_tora.md §4.5-4.6), carried into the batch.

A sample may hold ``{key}.traj.npy`` (float32 ``[N, T_src, 2]``: x, y in source pixels, one point per source frame)
and ``{key}.flow.npy`` (float16 ``[T_src - 1, 2, h, w]``: flow between consecutive source frames, in pixels of its
own size). Both are read without pickle and follow the clip the decoder cut: the same frame indices
(``clip_indices`` with the same random offset), the same crop and resize, the same flip. The batch then has

- ``trajectories``: float32 ``[B, N_max, T, 2]`` in pixels of the clip, NaN rows padding clips with fewer tracks;
- ``flow``: float32 ``[B, T - 1, 2, h', w']`` between the clip's consecutive frames (the source flows between two
  chosen frames are summed: a frame stride of 2 adds two flows), cropped like the clip, in pixels of the clip.

With ``VideoDataModule(motion=True)`` a sample without ``traj.npy`` is skipped and counted (``no_motion``).
"""

from __future__ import annotations

import io

import numpy as np
import torch

MOTION_MEMBERS = ("traj.npy", "flow.npy")


def has_motion(sample: dict) -> bool:
    return any(m in sample for m in MOTION_MEMBERS)


def _load(data: bytes) -> np.ndarray:
    from .decode import SkipSample

    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SkipSample("corrupt", f"motion npy: {e}") from e


def clip_motion(sample: dict, meta: dict, spec, u, step: float, height: int, width: int, flipped: bool) -> dict:
    """Trajectories / flow of the clip cut from ``sample`` (see the module docstring); {} when it has none."""
    from .decode import SkipSample, clip_indices

    out: dict = {}
    traj = _load(sample["traj.npy"]).astype(np.float32) if "traj.npy" in sample else None
    flow = _load(sample["flow.npy"]).astype(np.float32) if "flow.npy" in sample else None
    if traj is None and flow is None:
        return out
    if traj is not None and (traj.ndim != 3 or traj.shape[-1] != 2):
        raise SkipSample("corrupt", f"traj.npy has shape {traj.shape}, expected [N, T, 2]")
    n_src = traj.shape[1] if traj is not None else flow.shape[0] + 1
    size = (meta.get("motion") or {}).get("source_size") or [meta.get("height"), meta.get("width")]
    if not all(isinstance(v, (int, float)) and v for v in size):
        raise SkipSample("bad_json", "motion members need the source size (json motion.source_size or height/width)")
    src_h, src_w = float(size[0]), float(size[1])
    idx = clip_indices(n_src, spec.num_frames, step, None if u is None else float(u[0]), spec.short_policy)
    # the crop box of decode.resize_crop: the largest region of the target aspect, then a resize
    scale = max(height / src_h, width / src_w)
    ch, cw = min(src_h, round(height / scale)), min(src_w, round(width / scale))
    if spec.crop == "random" and u is not None:
        y0, x0 = int(float(u[1]) * (src_h - ch + 1)), int(float(u[2]) * (src_w - cw + 1))
    else:
        y0, x0 = (src_h - ch) // 2, (src_w - cw) // 2
    sx, sy = width / cw, height / ch
    if traj is not None:
        t = traj[:, idx]
        t = np.stack([(t[..., 0] - x0 + 0.5) * sx - 0.5, (t[..., 1] - y0 + 0.5) * sy - 0.5], -1)  # pixel centres
        if flipped:
            t[..., 0] = width - 1 - t[..., 0]
        out["trajectories"] = torch.from_numpy(t.astype(np.float32))
    if flow is not None:
        fh, fw = flow.shape[-2:]
        cum = np.concatenate([np.zeros_like(flow[:1]), np.cumsum(flow, 0)])  # displacement sums between frames
        f = cum[idx[1:]] - cum[idx[:-1]]
        ky, kx = fh / src_h, fw / src_w  # crop in flow pixels
        f = f[..., int(round(y0 * ky)): int(round((y0 + ch) * ky)), int(round(x0 * kx)): int(round((x0 + cw) * kx))]
        f = torch.from_numpy(np.ascontiguousarray(f))
        f[:, 0] *= width / max(f.shape[-1], 1)
        f[:, 1] *= height / max(f.shape[-2], 1)
        if flipped:
            f = f.flip(-1)
            f[:, 0] = -f[:, 0]
        out["flow"] = f
    return out


def collate_motion(samples: list[dict]) -> dict:
    """Batch entries for the motion keys present in every sample: trajectories NaN-padded to the most tracks."""
    out = {}
    if samples and all("trajectories" in s for s in samples):
        n = max(s["trajectories"].shape[0] for s in samples)
        t = samples[0]["trajectories"].shape[1]
        pad = torch.full((len(samples), n, t, 2), float("nan"))
        for i, s in enumerate(samples):
            pad[i, : s["trajectories"].shape[0]] = s["trajectories"]
        out["trajectories"] = pad
    if samples and all("flow" in s for s in samples) and len({tuple(s["flow"].shape) for s in samples}) == 1:
        out["flow"] = torch.stack([s["flow"] for s in samples])
    return out
