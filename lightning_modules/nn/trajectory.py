"""Trajectories for Tora (spec latte_tora.md §4.2, §4.6, §4.7): written once for the model, the data tool and TrajError.

Conventions: a trajectory is an array ``[T, 2]`` of (x, y) pixel positions (pixel centres at integer + 0.5 are not
assumed: x = column, y = row, origin top-left) with one point per frame; a clip's trajectories are a list of them or
an array ``[N, T, 2]``. Flow is ``[T, 2, H, W]`` with channels (u, v) = (dx, dy); frame t holds the displacement that
brought the points to frame t (so frame 0 is zero, §4.2 item 1).

- ``displacement_maps``: trajectories -> g in R^{T x 2 x H x W}: ``g[t+1, y_t, x_t] = p_{t+1} - p_t``, several
  trajectories summed, frames 1.. filtered with the 99x99 sigma=10 Gaussian normalised to centre weight 1 (§4.2 item 2).
- ``flow_visualisation``: g -> Middlebury colour wheel (``torchvision.utils.flow_to_image``) normalised by the clip's
  largest magnitude, mapped to [-1, 1] (§4.2 item 3). This is what the motion VAE encodes.
- ``canvas_to_frame`` / ``resample_points`` / ``load_trajectory_json``: user points drawn on a 256^2 canvas, rescaled
  to the frame and linearly interpolated to the clip length (§4.2 item 2).
- ``sample_sparse_trajectories``: the reference port's sparse sampler (§4.6): grid at stride 32 with a random offset,
  sampled proportionally to the first flow's magnitude without replacement, count uniform in [1, N], tracked forward
  with the rounded flow and clamped to the frame. Seeded: the same seed gives the same trajectories.
- ``optical_flow``: dense flow between consecutive frames, backend ``dis`` (OpenCV DIS, offline) or ``raft``
  (torchvision RAFT-Large from a local weights file).
- ``track_points`` / ``traj_error`` / ``TrajError``: TrajError (§4.7) = mean L1 distance in pixels between the given
  trajectory points and the points tracked from each trajectory's start through the generated video (OpenCV
  pyramidal Lucas-Kanade, or chained dense flow).
- ``draw_trajectories``: the trajectories drawn over a video (the path so far and a dot at the current point).

OpenCV (``opencv-python-headless``) is imported only by the flow / tracking functions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "CANVAS_SIZE",
    "FLOW_BACKENDS",
    "gaussian_kernel",
    "gaussian_filter",
    "resample_points",
    "canvas_to_frame",
    "load_trajectory_json",
    "as_trajectory_array",
    "displacement_maps",
    "dense_displacement",
    "flow_visualisation",
    "sample_sparse_trajectories",
    "optical_flow",
    "track_points",
    "traj_error",
    "TrajError",
    "draw_trajectories",
]

CANVAS_SIZE = 256  # user trajectories are drawn on a 256 x 256 canvas (§4.2 item 2)
FLOW_BACKENDS = ("dis", "raft")
TRACKERS = ("lk", "flow")


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian filter (§4.2 item 2)
# ----------------------------------------------------------------------------------------------------------------------
def gaussian_kernel(size: int = 99, sigma: float = 10.0) -> Tensor:
    """Isotropic 2D Gaussian ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` on a ``size x size`` grid, centre weight 1 (§4.2)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be a positive odd number, got {size}")
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return torch.outer(g, g).float()  # separable; g(0) = 1 so the centre is exactly 1


def gaussian_filter(flow: Tensor, size: int = 99, sigma: float = 10.0) -> Tensor:
    """Convolve each channel of ``[..., H, W]`` with ``gaussian_kernel`` (separable, zero padding, same size)."""
    if size <= 1 or sigma <= 0:
        return flow
    shape = flow.shape
    x = flow.reshape(-1, 1, shape[-2], shape[-1]).float()
    ax = torch.arange(size, dtype=torch.float32, device=flow.device) - size // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    half = size // 2
    x = F.conv2d(F.pad(x, (half, half, 0, 0)), g.view(1, 1, 1, size))
    x = F.conv2d(F.pad(x, (0, 0, half, half)), g.view(1, 1, size, 1))
    return x.reshape(shape).to(flow.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# User trajectories
# ----------------------------------------------------------------------------------------------------------------------
def resample_points(points: np.ndarray | Sequence, length: int) -> np.ndarray:
    """``[n, 2]`` points -> ``[length, 2]`` by linear interpolation along the point index (subsamples when n > length)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0:
        raise ValueError("a trajectory needs at least one point")
    if len(p) == 1:
        return np.repeat(p, length, axis=0)
    src = np.linspace(0.0, 1.0, len(p))
    dst = np.linspace(0.0, 1.0, length)
    return np.stack([np.interp(dst, src, p[:, 0]), np.interp(dst, src, p[:, 1])], axis=1)


def canvas_to_frame(points: np.ndarray, width: int, height: int, canvas: int | tuple[int, int] = CANVAS_SIZE
                    ) -> np.ndarray:
    """Points on the ``canvas`` (int: square; or (width, height)) -> pixel coordinates of a ``width x height`` frame."""
    cw, ch = (canvas, canvas) if isinstance(canvas, int) else canvas
    p = np.asarray(points, dtype=np.float64).copy()
    p[..., 0] *= width / cw
    p[..., 1] *= height / ch
    return p


def load_trajectory_json(source: str | os.PathLike | list | dict, num_frames: int, width: int, height: int,
                         canvas: int | None = None) -> np.ndarray:
    """A trajectory file -> ``[N, num_frames, 2]`` pixel trajectories of a ``width x height`` frame.

    Accepted: a list of objects, each a list of ``[x, y]`` points on the canvas (default 256 x 256), or a mapping
    ``{"canvas": 256 | [w, h], "trajectories": [...]}``. Each object is linearly interpolated to ``num_frames``."""
    obj = source
    if isinstance(source, (str, os.PathLike)):
        with open(source) as f:
            obj = json.load(f)
    if isinstance(obj, dict):
        canvas = obj.get("canvas", canvas)
        obj = obj.get("trajectories")
    canvas = CANVAS_SIZE if canvas is None else (tuple(canvas) if isinstance(canvas, (list, tuple)) else int(canvas))
    if not isinstance(obj, list) or not obj or not all(isinstance(t, list) and t for t in obj):
        raise ValueError(f"trajectory file {source if isinstance(source, (str, os.PathLike)) else '<object>'}: expected "
                         "a non-empty list of objects, each a non-empty list of [x, y] points on a 256x256 canvas")
    out = []
    for i, t in enumerate(obj):
        arr = np.asarray(t, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"trajectory {i}: points must be [x, y] pairs, got an array of shape {arr.shape}")
        out.append(resample_points(canvas_to_frame(arr, width, height, canvas), num_frames))
    return np.stack(out).astype(np.float32)


def as_trajectory_array(trajs) -> np.ndarray:
    """A list of ``[T, 2]`` / an array ``[N, T, 2]`` / a tensor -> float64 ``[N, T, 2]``; NaN rows (padding) dropped."""
    if isinstance(trajs, Tensor):
        trajs = trajs.detach().cpu().double().numpy()
    arr = np.asarray(trajs, dtype=np.float64) if not isinstance(trajs, list) else (
        np.stack([np.asarray(t, dtype=np.float64) for t in trajs]) if trajs else np.zeros((0, 1, 2)))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise ValueError(f"trajectories must be [N, T, 2] (x, y per frame), got shape {arr.shape}")
    return arr[~np.isnan(arr).any(axis=(1, 2))]


# ----------------------------------------------------------------------------------------------------------------------
# Displacement maps and their visualisation (§4.2 items 1-3)
# ----------------------------------------------------------------------------------------------------------------------
def displacement_maps(trajs, height: int, width: int, blur: bool = True, kernel_size: int = 99,
                      sigma: float = 10.0) -> Tensor:
    """Trajectories ``[N, T, 2]`` -> g ``[T, 2, H, W]`` float32 (§4.2 items 1-2).

    ``g[t+1, :, round(y_t), round(x_t)] += p_{t+1} - p_t`` for every trajectory (summed); frame 0 is zero; points
    outside the frame are left out; frames 1.. are filtered with the Gaussian of centre weight 1."""
    arr = as_trajectory_array(trajs)
    n, t = arr.shape[0], arr.shape[1] if arr.size else 1
    g = torch.zeros(t, 2, height, width)
    if n == 0 or t < 2:
        return g
    p = arr[:, :-1]
    d = arr[:, 1:] - arr[:, :-1]  # [N, T-1, 2]
    xi, yi = np.rint(p[..., 0]).astype(np.int64), np.rint(p[..., 1]).astype(np.int64)
    ok = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    frame = np.broadcast_to(np.arange(1, t), ok.shape)
    flat = torch.from_numpy((frame[ok] * height + yi[ok]) * width + xi[ok])
    for c in range(2):  # index_put with accumulate: trajectories through the same pixel add up
        plane = torch.zeros(t * height * width)
        plane.index_put_((flat,), torch.from_numpy(d[..., c][ok]).float(), accumulate=True)
        g[:, c] = plane.view(t, height, width)
    if blur:
        g[1:] = gaussian_filter(g[1:], kernel_size, sigma)
    return g


def dense_displacement(flow: Tensor | np.ndarray) -> Tensor:
    """Dense flow between consecutive frames ``[T-1, 2, H, W]`` -> ``[T, 2, H, W]`` with a zero frame 0 (§4.6)."""
    f = torch.as_tensor(np.asarray(flow) if not isinstance(flow, Tensor) else flow).float()
    return torch.cat([torch.zeros_like(f[:1]), f], dim=0)


def flow_visualisation(flow: Tensor) -> Tensor:
    """g ``[T, 2, H, W]`` (or ``[B, T, 2, H, W]``) -> Middlebury colour wheel ``[3, T, H, W]`` (``[B, 3, T, H, W]``) in
    [-1, 1], normalised by the largest magnitude of each clip (zero flow is white, +1) (§4.2 item 3)."""
    from torchvision.utils import flow_to_image

    if flow.ndim == 5:
        return torch.stack([flow_visualisation(f) for f in flow])
    img = flow_to_image(flow.float())  # one call per clip: normalised by the clip's maximum over all frames
    return rearrange(img.float() / 255.0 * 2.0 - 1.0, "t c h w -> c t h w")


# ----------------------------------------------------------------------------------------------------------------------
# Sparse trajectories (§4.6, the port's sampler)
# ----------------------------------------------------------------------------------------------------------------------
def sample_sparse_trajectories(flow: np.ndarray | Tensor, rng: np.random.Generator | int, max_tracks: int = 16,
                               stride: int = 32, min_tracks: int = 1) -> np.ndarray:
    """Dense flow ``[T-1, 2, H, W]`` -> sparse trajectories ``[n, T, 2]`` float32, n uniform in [min, max_tracks].

    Candidates: a grid at ``stride`` with a random offset; drawn without replacement with probability proportional to
    the first flow's magnitude there (uniform when the first flow is zero); each is tracked forward with the flow at
    its rounded position and clamped to the frame."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    f = flow.detach().cpu().numpy() if isinstance(flow, Tensor) else np.asarray(flow)
    steps, _, h, w = f.shape
    ox, oy = (int(v) for v in rng.integers(0, stride, size=2))
    ys, xs = np.meshgrid(np.arange(oy % h, h, stride), np.arange(ox % w, w, stride), indexing="ij")
    xs, ys = xs.ravel(), ys.ravel()
    mag = np.hypot(f[0, 0, ys, xs], f[0, 1, ys, xs]).astype(np.float64) if steps else np.zeros(len(xs))
    n = int(rng.integers(min_tracks, max_tracks + 1))
    nonzero = int((mag > 0).sum())
    if nonzero == 0:
        prob = np.full(len(xs), 1.0 / len(xs))
        n = min(n, len(xs))
    else:
        prob = mag / mag.sum()
        n = min(n, nonzero)
    pick = rng.choice(len(xs), size=n, replace=False, p=prob)
    out = np.zeros((n, steps + 1, 2), np.float32)
    p = np.stack([xs[pick], ys[pick]], axis=1).astype(np.float64)
    out[:, 0] = p
    for t in range(steps):
        xi = np.clip(np.rint(p[:, 0]).astype(np.int64), 0, w - 1)
        yi = np.clip(np.rint(p[:, 1]).astype(np.int64), 0, h - 1)
        p = p + np.rint(f[t][:, yi, xi].T)  # the port tracks with the rounded flow
        p[:, 0] = np.clip(p[:, 0], 0, w - 1)
        p[:, 1] = np.clip(p[:, 1], 0, h - 1)
        out[:, t + 1] = p
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Optical flow and tracking
# ----------------------------------------------------------------------------------------------------------------------
def _grey_frames(video) -> np.ndarray:
    """[C, T, H, W] float in [-1, 1] (tensor) or [T, H, W, 3] uint8 (array) -> uint8 grey [T, H, W]."""
    if isinstance(video, Tensor):
        v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        v = rearrange(v, "c t h w -> t h w c").cpu().numpy()
    else:
        v = np.asarray(video)
    if v.shape[-1] == 3:
        v = (v[..., 0] * 0.299 + v[..., 1] * 0.587 + v[..., 2] * 0.114).round().clip(0, 255).astype(np.uint8)
    return v.astype(np.uint8)


_RAFT_CACHE: dict = {}


def optical_flow(video, backend: str = "dis", raft_weights: str | None = None, preset: str = "medium") -> np.ndarray:
    """Dense flow between consecutive frames: ``[T-1, 2, H, W]`` float32 in pixels.

    video: ``[C, T, H, W]`` float in [-1, 1] or ``[T, H, W, 3]`` uint8. backend ``dis``: OpenCV DIS (``preset``
    ultrafast | fast | medium); ``raft``: torchvision ``raft_large`` with weights from the local file
    ``raft_weights`` (never downloaded)."""
    if backend == "dis":
        import cv2

        grey = _grey_frames(video)
        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        dis = cv2.DISOpticalFlow_create(presets[preset])
        out = [dis.calc(grey[t], grey[t + 1], None) for t in range(len(grey) - 1)]
        return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) if out else np.zeros(
            (0, 2) + grey.shape[1:], np.float32)
    if backend == "raft":
        if not raft_weights or not os.path.exists(raft_weights):
            raise FileNotFoundError(f"flow backend 'raft' needs raft_weights: a local torchvision raft_large state dict "
                                    f"file (got {raft_weights!r}); weights are never downloaded")
        from torchvision.models.optical_flow import raft_large

        from .checkpoint import read_state_dict

        model = _RAFT_CACHE.get(raft_weights)
        if model is None:
            model = raft_large(weights=None)
            model.load_state_dict(read_state_dict(raft_weights))
            _RAFT_CACHE[raft_weights] = model = model.eval()
        if isinstance(video, Tensor):
            v = rearrange(video.float().clamp(-1, 1), "c t h w -> t c h w")
        else:
            v = rearrange(torch.from_numpy(np.asarray(video)).float() / 127.5 - 1, "t h w c -> t c h w")
        h, w = v.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8  # RAFT needs multiples of 8
        v = F.pad(v, (0, pw, 0, ph), mode="replicate")
        with torch.no_grad():
            flow = model(v[:-1], v[1:])[-1][..., :h, :w]
        return flow.numpy().astype(np.float32)
    raise ValueError(f"flow backend must be one of {FLOW_BACKENDS}, got {backend!r}")


def track_points(video, start: np.ndarray, tracker: str = "lk", flow_backend: str = "dis",
                 raft_weights: str | None = None) -> np.ndarray:
    """Track ``start`` points ``[N, 2]`` (x, y) through ``video`` -> ``[N, T, 2]``.

    ``lk``: OpenCV pyramidal Lucas-Kanade frame to frame (21x21 window, 3 levels); a lost point keeps its last position.
    ``flow``: chained dense flow of ``optical_flow`` sampled bilinearly at each point."""
    start = np.asarray(start, np.float32).reshape(-1, 2)
    if tracker == "lk":
        import cv2

        grey = _grey_frames(video)
        h, w = grey.shape[1:]
        out = np.zeros((len(start), len(grey), 2), np.float32)
        p = start.copy()
        out[:, 0] = p
        for t in range(len(grey) - 1):
            if len(p):
                q, st, _ = cv2.calcOpticalFlowPyrLK(grey[t], grey[t + 1], p.reshape(-1, 1, 2), None,
                                                    winSize=(21, 21), maxLevel=3)
                q = q.reshape(-1, 2)
                lost = (st.reshape(-1) == 0) | ~np.isfinite(q).all(1)
                q[lost] = p[lost]
                p = np.stack([q[:, 0].clip(0, w - 1), q[:, 1].clip(0, h - 1)], 1).astype(np.float32)
            out[:, t + 1] = p
        return out
    if tracker == "flow":
        flow = torch.from_numpy(optical_flow(video, flow_backend, raft_weights))
        steps, _, h, w = flow.shape
        out = np.zeros((len(start), steps + 1, 2), np.float32)
        p = torch.from_numpy(start).float()
        out[:, 0] = start
        for t in range(steps):
            grid = torch.stack([p[:, 0] / max(w - 1, 1), p[:, 1] / max(h - 1, 1)], -1) * 2 - 1
            d = F.grid_sample(flow[t : t + 1], grid.view(1, 1, -1, 2), align_corners=True)[0, :, 0].T
            p = p + d
            p[:, 0].clamp_(0, w - 1)
            p[:, 1].clamp_(0, h - 1)
            out[:, t + 1] = p.numpy()
        return out
    raise ValueError(f"tracker must be one of {TRACKERS}, got {tracker!r}")


def traj_error(video, trajs, tracker: str = "lk", **kw) -> tuple[float, int]:
    """TrajError of one clip (§4.7): (sum of per-point L1 distances ``|dx| + |dy|`` in pixels, number of points).

    Each trajectory's start point is tracked through ``video``; points are compared at frames 1..T-1 (frame 0 is the
    start itself). Divide the sum by the count for the clip's mean."""
    arr = as_trajectory_array(trajs)
    if arr.shape[0] == 0:
        return 0.0, 0
    tracked = track_points(video, arr[:, 0], tracker=tracker, **kw)
    t = min(tracked.shape[1], arr.shape[1])
    d = np.abs(tracked[:, 1:t] - arr[:, 1:t]).sum(-1)  # L1 per point
    return float(d.sum()), int(d.size)


try:
    from torchmetrics import Metric
except ImportError:  # pragma: no cover - torchmetrics is a dependency
    Metric = object  # type: ignore[misc,assignment]


class TrajError(Metric):
    """TrajError (Tora §4.7): mean L1 distance in pixels between given trajectories and those tracked in the videos.

    ``update(videos [B, C, T, H, W] in [-1, 1], trajectories)`` with trajectories a list (one per video) of
    ``[N, T, 2]`` pixel arrays (or a padded tensor ``[B, N, T, 2]`` with NaN rows for missing objects);
    ``compute()`` -> mean over every tracked point of every clip. Sums reduce across processes."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, tracker: str = "lk", flow_backend: str = "dis", raft_weights: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if tracker not in TRACKERS:
            raise ValueError(f"TrajError tracker must be one of {TRACKERS}, got {tracker!r}")
        self.tracker, self.flow_backend, self.raft_weights = tracker, flow_backend, raft_weights
        self.add_state("error_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: Tensor, trajectories) -> None:
        for video, trajs in zip(videos, trajectories):
            s, n = traj_error(video, trajs, tracker=self.tracker, flow_backend=self.flow_backend,
                              raft_weights=self.raft_weights)
            self.error_sum += s
            self.count += n

    def compute(self) -> Tensor:
        return (self.error_sum / self.count.clamp(min=1)).float()


# ----------------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------------
TRACK_COLOURS = ((1.0, 1.0, 1.0), (1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.3, 0.5, 1.0), (1.0, 1.0, 0.2), (1.0, 0.3, 1.0))


def draw_trajectories(video: Tensor, trajs, radius: int = 1, colours=TRACK_COLOURS) -> Tensor:
    """``video [C, T, H, W]`` in [-1, 1] -> a copy with each trajectory's path up to frame t drawn on frame t and a
    dot of ``radius`` at its current point (pure torch; no file written)."""
    arr = as_trajectory_array(trajs)
    out = video.detach().clone().float()
    c, t, h, w = out.shape
    for i, traj in enumerate(arr):
        col = torch.tensor(colours[i % len(colours)], dtype=out.dtype)[:c] * 2 - 1
        path = []
        for f in range(min(t, traj.shape[0])):
            if f:  # dense samples along the segment from the previous point
                a, b = traj[f - 1], traj[f]
                k = max(2, int(math.ceil(np.abs(b - a).max() * 2)) + 1)
                path.append(a[None] + (b - a)[None] * np.linspace(0, 1, k)[:, None])
            pts = np.concatenate(path) if path else traj[:1]
            xi, yi = np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            out[:, f, yi[ok], xi[ok]] = col[:, None]
            cx, cy = int(round(traj[f, 0])), int(round(traj[f, 1]))
            out[:, f, max(0, cy - radius): cy + radius + 1, max(0, cx - radius): cx + radius + 1] = col[:, None, None]
    return out
