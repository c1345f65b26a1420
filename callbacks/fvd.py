"""Fréchet Video Distance (Unterthiner et al. 2018, Eq. 1) with the reference Kinetics-400 I3D.

``FVD = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr((S_r S_g)^(1/2))`` between Gaussians fitted to I3D logits of
real and generated clips. The protocol is pinned below (``FVD_*`` constants); see the README's FVD section.

- :class:`FrechetVideoDistance`: a torchmetrics ``Metric`` keeping float64 sums (``sum``, ``sum of outer products``,
  ``count``; ``dist_reduce_fx="sum"``), so the value is the same on 1 or N processes for the same samples.
  ``update(x, real=...)`` takes videos ``[B, C, T, H, W]`` in [-1, 1] (runs I3D) or features ``[B, D]``.
- :func:`frechet_distance`: the closed form, computed in float64 through the symmetric matrix
  ``S_r^(1/2) S_g S_r^(1/2)`` (same eigenvalues as ``S_r S_g``), so no complex ``sqrtm``.
- Real statistics are cached as ``.npz`` files keyed by the data (shard list hash), protocol, feature network and
  sample count (:func:`real_stats_path`).
- :class:`FVDCallback`: every N steps draws samples with ``pl_module.generate(...)`` and logs ``val/fvd``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import Metric

from vidgen.datamodules import tario
from vidgen.datamodules.decode import ClipSpec, SkipSample, read_video
from vidgen.datamodules.tario import VIDEO_EXTS
from vidgen.lightning_modules.nn.batches import keep_valid, valid_rows
from vidgen.lightning_modules.nn.checkpoint import default_cache_dir

# ---------------------------------------------------------------------------------------------- protocol (pinned)
FVD_NUM_FRAMES = 16  # the first 16 frames of each clip, at the clip's own frame rate
FVD_RESOLUTION = 224  # every frame resized to 224 x 224 (aspect ratio not kept, no crop)
FVD_RESIZE = "bilinear, half-pixel centres (align_corners=False), no antialias, on [-1, 1] float frames"
FVD_FEATURES = "i3d-k400 logits (400-d, pre-softmax)"
FVD_NUM_SAMPLES = 2048  # real and generated clips; real statistics from the train split
FVD_FEATURE_DIM = 400
FVD_PROTOCOL = "vidgen-fvd/1: i3d-k400 logits400, first 16 frames, bilinear 224x224 from [-1,1]"

STATS_FORMAT = "vidgen-fvd-stats/1"

__all__ = [
    "FVD_NUM_FRAMES", "FVD_RESOLUTION", "FVD_NUM_SAMPLES", "FVD_FEATURE_DIM", "FVD_PROTOCOL",
    "preprocess_for_i3d", "frechet_distance", "FeatureStats", "FrechetFeatureDistance", "FrechetVideoDistance", "extractor_id",
    "real_stats_path", "expand_sources", "iter_clips", "accumulate_source", "compute_real_stats", "FVDCallback",
]


# ---------------------------------------------------------------------------------------------- preprocessing
def preprocess_for_i3d(video: Tensor, num_frames: int = FVD_NUM_FRAMES, resolution: int = FVD_RESOLUTION) -> Tensor:
    """``[B, C, T, H, W]`` in [-1, 1] -> float32 ``[B, 3, num_frames, res, res]`` (first frames, bilinear resize).

    Values are clamped to [-1, 1]; one-channel videos are repeated to RGB.
    """
    if video.ndim != 5:
        raise ValueError(f"FVD expects videos [B, C, T, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    if c not in (1, 3):
        raise ValueError(f"FVD videos need 1 or 3 channels in dim 1 ([B, C, T, H, W]); got C={c}")
    if t < num_frames:
        raise ValueError(f"FVD uses {num_frames} frames per clip but the videos have T={t}; generate longer clips")
    x = video[:, :, :num_frames].float().clamp(-1.0, 1.0)
    if c == 1:
        x = repeat(x, "b 1 t h w -> b 3 t h w")
    if (h, w) != (resolution, resolution):
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False,
                               antialias=False)
        x = rearrange(frames, "(b t) c h w -> b c t h w", b=b).clamp(-1.0, 1.0)  # round-off of the weights
    return x.contiguous()


# ---------------------------------------------------------------------------------------------- Fréchet distance
def _f64(x: Any) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().to("cpu", torch.float64)


def _sym(m: Tensor) -> Tensor:
    return 0.5 * (m + m.T)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (Dowson & Landau 1982).

    ``tr((S1 S2)^(1/2))`` is the sum of square roots of the eigenvalues of ``S1^(1/2) S2 S1^(1/2)`` (similar to
    ``S1 S2``, but symmetric PSD), so two ``eigh`` calls replace the complex ``sqrtm``. Eigenvalues below
    ``D * eps * max`` are round-off of exact zeros (singular covariances, n < D) and are set to 0 rather than
    clamped: a zero eigenvalue carrying round-off ``e`` would otherwise add ``sqrt(e)``, which over hundreds of
    null directions biases FVD(x, x) by ~1e-4. Otherwise this equals the ``scipy.linalg.sqrtm`` formula.
    """
    mu1, mu2, s1, s2 = _f64(mu1), _f64(mu2), _sym(_f64(sigma1)), _sym(_f64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)}/{tuple(s2.shape)}")
    eps = torch.finfo(torch.float64).eps
    evals, evecs = torch.linalg.eigh(s1)
    keep = evals > evals.abs().max() * evals.numel() * eps
    half = evecs[:, keep] * evals[keep].sqrt()  # V_r Λ_r^(1/2): S1^(1/2) S2 S1^(1/2) ~ half.T S2 half (r x r)
    tr_covmean = torch.zeros((), dtype=torch.float64)
    if half.shape[1]:
        ek = torch.linalg.eigvalsh(_sym(half.T @ s2 @ half))
        tr_covmean = ek[ek > ek.abs().max() * ek.numel() * eps].sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean)


class FeatureStats:
    """Streaming first and second moments of features: ``sum``, ``outer`` (sum of x x^T), ``n`` (float64)."""

    def __init__(self, total: Tensor, outer: Tensor, n: int | float, meta: dict | None = None):
        self.total, self.outer, self.n = _f64(total), _f64(outer), int(round(float(n)))
        self.meta = dict(meta or {})

    @property
    def mu(self) -> Tensor:
        return self.total / self.n

    @property
    def sigma(self) -> Tensor:
        """Unbiased covariance (divides by n - 1, like ``np.cov``)."""
        if self.n < 2:
            raise ValueError(f"FVD needs at least 2 clips per side, got {self.n}")
        mu = self.mu
        return _sym(self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    @classmethod
    def from_features(cls, feats: Any, meta: dict | None = None) -> "FeatureStats":
        f = _f64(feats)
        return cls(f.sum(0), f.T @ f, f.shape[0], meta)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, sum=self.total.numpy(), outer=self.outer.numpy(), n=np.int64(self.n),
                 mu=self.mu.numpy(), sigma=self.sigma.numpy(),
                 meta=np.asarray(json.dumps({"format": STATS_FORMAT, **self.meta}, sort_keys=True)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            if meta.get("format") != STATS_FORMAT:
                raise ValueError(f"{path} is not a vidgen FVD statistics file ({STATS_FORMAT})")
            return cls(z["sum"], z["outer"], int(z["n"]), meta)


# ---------------------------------------------------------------------------------------------- the metric
def extractor_id(extractor: nn.Module | None) -> str:
    """Name of the feature network that goes into cache keys (features of different networks never mix)."""
    if extractor is None:
        return "features"
    name = type(extractor).__name__
    return {"InceptionI3d": "i3d-k400-reference", "TorchScriptI3D": "i3d-k400-stylegan-v-torchscript",
            "FeatureExtractorInceptionV3": "inception-v3-pt_inception-2015-12-05"}.get(name, name)


class FrechetFeatureDistance(Metric):
    """Fréchet distance between Gaussians fitted to network features of real and generated videos (FVD, FID).

    The shared part of :class:`FrechetVideoDistance` and the frame FID (``vidgen.callbacks.metrics.FrameFID``):
    float64 streaming sums per side (``sum``, ``sum of outer products``, ``count``; ``dist_reduce_fx="sum"``, so
    1 and N processes give the same value), fixed real statistics, :func:`frechet_distance`. A subclass sets
    ``protocol`` and implements :meth:`prepare` (the protocol's frames and size, idempotent) and :meth:`features`
    (prepared videos -> ``[N, D]``; one row per clip for FVD, per frame for FID).
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False
    protocol = "features"
    what = "clips"  # what one feature row is (error messages)
    num_frames = 1  # frames each clip needs (clip reading skips shorter ones)
    build_hint = "a feature network"  # how to build the network (error messages)
    rows_per_clip = 1  # feature rows one clip gives

    def __init__(self, feature_extractor: nn.Module | None, num_features: int,
                 real_stats: FeatureStats | str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.extractor = feature_extractor
        if self.extractor is not None:
            self.extractor.eval().requires_grad_(False)
        self.num_features = d = int(num_features)
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.fixed_real: FeatureStats | None = None
        if real_stats is not None:
            self.set_real_stats(real_stats)

    def set_real_stats(self, stats: FeatureStats | str | os.PathLike) -> None:
        """Use fixed real statistics (e.g. a cache from :func:`compute_real_stats`)."""
        if not isinstance(stats, FeatureStats):
            stats = FeatureStats.load(stats)
        if stats.total.numel() != self.num_features:
            raise ValueError(f"real statistics have D={stats.total.numel()}, the metric D={self.num_features}")
        self.fixed_real = stats

    def prepare(self, videos: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` in [-1, 1] -> the protocol's clips (idempotent: preparing twice changes nothing)."""
        raise NotImplementedError

    def network_input(self, prepared: Tensor) -> Tensor:
        """What the network takes, from prepared clips (identity for FVD)."""
        return prepared

    @torch.no_grad()
    def features(self, videos: Tensor) -> Tensor:
        """Videos ``[B, C, T, H, W]`` in [-1, 1] -> float32 features ``[N, D]`` (preprocessing + network, no autocast;
        a network returning a tuple gives its first entry)."""
        if self.extractor is None:
            raise ValueError(f"this {type(self).__name__} has no feature_extractor: pass features [N, D], or build it "
                             f"with feature_extractor={self.build_hint}")
        x = self.network_input(self.prepare(videos))
        dev = next(iter(self.extractor.parameters()), x).device if isinstance(self.extractor, nn.Module) else x.device
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.extractor(x.to(dev))
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    def update(self, x: Tensor, real: bool) -> None:  # type: ignore[override]
        """Add videos ``[B, C, T, H, W]`` (run through the network) or features ``[N, D]`` to one side."""
        if x.ndim == 5:
            x = self.features(x)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected videos [B, C, T, H, W] or features [N, {self.num_features}], "
                             f"got {tuple(x.shape)}")
        f = x.detach().to(self.real_sum.device, torch.float64)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + f.shape[0])

    def stats(self, real: bool) -> FeatureStats:
        """Accumulated statistics of one side (after ``compute()``/``sync()`` they cover all ranks)."""
        side = "real" if real else "fake"
        return FeatureStats(getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer"),
                            float(getattr(self, f"{side}_n")))

    def compute(self) -> Tensor:
        fake = self.stats(real=False)
        real = self.fixed_real if self.fixed_real is not None else self.stats(real=True)
        for name, s in (("generated", fake), ("real", real)):
            if s.n < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 {name} {self.what}, got {s.n}")
        return torch.tensor(frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma), dtype=torch.float64)


class FrechetVideoDistance(FrechetFeatureDistance):
    """FVD (Unterthiner et al. 2018, Eq. 1) as a torchmetrics Metric with float64 streaming sums (DDP-safe).

    Args:
        feature_extractor: a module mapping preprocessed clips ``[B, 3, 16, 224, 224]`` to features ``[B, D]``
            (normally :class:`vidgen.lightning_modules.nn.i3d.InceptionI3d`), or a local path for
            :func:`vidgen.lightning_modules.nn.i3d.load_i3d`, or None to feed features only.
        num_features: D (default: the extractor's ``feature_dim`` or 400).
        real_stats: a :class:`FeatureStats` or a path to a cached ``.npz``: fixed real statistics, used instead of
            the real-side states and kept across ``reset()``. They are not synced (each rank holds the same copy).
        num_frames, resolution: the protocol (16, 224); change only for experiments.
    """

    protocol = FVD_PROTOCOL
    build_hint = "load_i3d('i3d_k400.pt')"

    def __init__(
        self,
        feature_extractor: nn.Module | str | os.PathLike | None = None,
        num_features: int | None = None,
        real_stats: FeatureStats | str | os.PathLike | None = None,
        num_frames: int = FVD_NUM_FRAMES,
        resolution: int = FVD_RESOLUTION,
        **kwargs: Any,
    ):
        if isinstance(feature_extractor, (str, os.PathLike)):
            from vidgen.lightning_modules.nn.i3d import load_i3d

            feature_extractor = load_i3d(feature_extractor)
        d = num_features or int(getattr(feature_extractor, "feature_dim", FVD_FEATURE_DIM))
        super().__init__(feature_extractor, d, real_stats, **kwargs)
        self.num_frames, self.resolution = num_frames, resolution

    def prepare(self, videos: Tensor) -> Tensor:
        return preprocess_for_i3d(videos, self.num_frames, self.resolution)


# ---------------------------------------------------------------------------------------------- reading clips
def expand_sources(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shards/videos named by ``spec``: a directory (its ``*.tar``, else its video files), a brace pattern, a glob,
    a single file, or a list of those. Sorted, so "the first N samples" is well defined."""
    if not isinstance(spec, (str, os.PathLike)):
        return [p for s in spec for p in expand_sources(s)]
    spec = os.fspath(spec)
    if os.path.isdir(spec) and not glob.glob(os.path.join(glob.escape(spec), "*.tar")):
        vids = sorted(p for p in glob.glob(os.path.join(glob.escape(spec), "*")) if p.rsplit(".", 1)[-1].lower() in VIDEO_EXTS)
        if not vids:
            raise FileNotFoundError(f"{spec} holds no .tar shards and no video files ({', '.join(VIDEO_EXTS)})")
        return vids
    try:
        return tario.expand_shards(spec, what="FVD source")
    except tario.ShardError as e:
        raise FileNotFoundError(str(e)) from e


def _decode_first_frames(data: bytes, num_frames: int) -> np.ndarray | None:
    """uint8 ``[num_frames, H, W, 3]``: the first frames at the source rate, decoded as the datamodule decodes
    (decord from memory, PyAV fallback); None when the clip is too short."""
    spec = ClipSpec(num_frames=num_frames, frame_stride=1, short_policy="skip")
    try:
        frames, _, _ = read_video(data, spec, 0.0, None)
    except SkipSample as e:
        if e.reason == "too_short":
            return None
        raise
    return frames


def _iter_encoded(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        if not path.endswith(".tar"):
            with open(path, "rb") as f:
                yield os.path.basename(path), f.read()
            continue
        for key, sample in tario.iter_stream(path):  # streamed, in tar order
            ext = next((e for e in VIDEO_EXTS if e in sample), None)
            if ext is not None:
                yield f"{path}:{key}", sample[ext]


def iter_clips(spec: Any, num_frames: int = FVD_NUM_FRAMES, rank: int = 0, world: int = 1,
               limit: int | None = None) -> Iterator[tuple[int, str, np.ndarray | None]]:
    """``(index, key, uint8 [T, H, W, 3] or None)`` for the first ``limit`` videos of ``spec`` in order.

    Only indices with ``index % world == rank`` are decoded and yielded, so N processes together see exactly the
    clips one process sees. Clips shorter than ``num_frames`` (or undecodable) come back as None. ``spec`` may also
    be a ``samples.npz`` (``videos`` uint8 ``[N, T, H, W, 3]``, what the demo and the prediction writer save).
    """
    if isinstance(spec, (str, os.PathLike)) and os.fspath(spec).endswith(".npz"):
        with np.load(spec, allow_pickle=False) as z:
            if "videos" not in z.files:
                raise ValueError(f"{spec} has no 'videos' array (a samples.npz holds uint8 [N, T, H, W, 3])")
            videos = z["videos"]
        for i in range(len(videos) if limit is None else min(limit, len(videos))):
            if i % world == rank:
                v = videos[i]
                yield i, f"{os.fspath(spec)}:{i}", (v[:num_frames] if v.shape[0] >= num_frames else None)
        return
    for i, (key, data) in enumerate(_iter_encoded(expand_sources(spec))):
        if limit is not None and i >= limit:
            return
        if i % world != rank:
            continue
        try:
            frames = _decode_first_frames(data, num_frames)
        except Exception:  # noqa: BLE001 - a broken file counts as a skipped clip, reported by the caller
            frames = None
        yield i, key, frames


def _u8_to_video(frames: np.ndarray) -> Tensor:
    return rearrange(torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0, "t h w c -> 1 c t h w")


def accumulate_source(metric: FrechetFeatureDistance, spec: Any, real: bool, num_samples: int, batch_size: int = 8,
                      rank: int = 0, world: int = 1, device: str | torch.device = "cpu") -> dict:
    """Feed the first ``num_samples`` videos of ``spec`` (this rank's share) to ``metric``; returns counts.

    Each clip goes through ``metric.prepare`` on its own (sizes differ); clips of one prepared shape are batched."""
    used = skipped = 0
    buf: list[Tensor] = []

    def flush() -> None:
        if buf:
            metric.update(torch.cat(buf).to(device), real=real)
            buf.clear()

    for _, _, frames in iter_clips(spec, metric.num_frames, rank, world, limit=num_samples):
        if frames is None:
            skipped += 1
            continue
        clip = metric.prepare(_u8_to_video(frames).to(device))
        if buf and clip.shape[1:] != buf[0].shape[1:]:
            flush()
        buf.append(clip)
        used += 1
        if len(buf) == batch_size:
            flush()
    flush()
    return {"used": used, "skipped": skipped}


def _data_fingerprint(spec: Any) -> list[list]:
    return [[os.path.abspath(p), os.path.getsize(p)] for p in expand_sources(spec)]


def real_stats_path(spec: Any, num_samples: int, extractor: str, cache_dir: str | os.PathLike | None = None,
                    protocol: str = FVD_PROTOCOL) -> Path:
    """Cache file for real statistics, keyed by the data (shard paths + sizes), protocol, network and count."""
    key = json.dumps({"data": _data_fingerprint(spec), "protocol": protocol, "extractor": extractor,
                      "num_samples": int(num_samples)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "fvd"
    return root / f"real_{digest}_n{num_samples}.npz"


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def compute_real_stats(spec: Any, extractor: nn.Module | FrechetFeatureDistance, num_samples: int = FVD_NUM_SAMPLES,
                       batch_size: int = 8, device: str | torch.device = "cpu",
                       cache: str | os.PathLike | None | bool = None, log=print) -> FeatureStats:
    """Real statistics of the first ``num_samples`` clips of ``spec``, read from / written to the cache.

    ``extractor``: the I3D (FVD's protocol), or a :class:`FrechetFeatureDistance` whose protocol and network are used
    (e.g. the frame FID; its states are reset). ``cache``: a file path, None (the keyed default under
    ``~/.cache/vidgen/fvd``) or False (no cache). Under torch.distributed every rank decodes its share; rank 0
    writes the file.
    """
    metric = extractor if isinstance(extractor, FrechetFeatureDistance) else FrechetVideoDistance(extractor)
    ext, name = extractor_id(metric.extractor), type(metric).__name__
    path = None if cache is False else Path(cache) if cache else real_stats_path(spec, num_samples, ext,
                                                                                  protocol=metric.protocol)
    if path is not None and path.is_file():
        stats = FeatureStats.load(path)
        _check_meta(stats, path, num_samples, ext, metric.protocol)
        return stats
    rank, world = _dist()
    metric = metric.to(device)
    metric.reset()
    t0 = time.time()
    counts = accumulate_source(metric, spec, True, num_samples, batch_size, rank, world, device)
    metric.sync(should_sync=world > 1)
    stats = metric.stats(real=True)
    metric.unsync(should_unsync=world > 1)
    metric.reset()
    clips = stats.n // metric.rows_per_clip
    if clips < num_samples:
        warnings.warn(f"{name} real statistics use {clips} clips, fewer than the {num_samples} asked for "
                      f"({counts['skipped']} skipped on rank {rank}: shorter than {metric.num_frames} frames or "
                      f"undecodable); the Fréchet distance is biased upwards with few samples", stacklevel=2)
    stats.meta = {"protocol": metric.protocol, "extractor": ext, "num_samples": int(num_samples),
                  "n": stats.n, "clips": clips, "data": _data_fingerprint(spec), "seconds": round(time.time() - t0, 1)}
    if path is not None and rank == 0:
        stats.save(path)
        log(f"{name} real statistics ({clips} clips, {stats.n} feature rows) cached at {path}")
    return stats


def _check_meta(stats: FeatureStats, path: Path, num_samples: int | None, extractor: str | None,
                protocol: str = FVD_PROTOCOL) -> None:
    m = stats.meta
    if m.get("protocol") != protocol:
        raise ValueError(f"{path} was made under protocol {m.get('protocol')!r}, not {protocol!r}; delete it")
    if extractor is not None and m.get("extractor") != extractor:
        raise ValueError(f"{path} holds {m.get('extractor')} features but the metric uses {extractor}")
    if num_samples is not None and m.get("num_samples") != num_samples:
        warnings.warn(f"{path} was computed from {m.get('num_samples')} clips, not {num_samples}", stacklevel=3)


# ---------------------------------------------------------------------------------------------- the callback
def _slice_batch(batch: dict, n: int) -> dict:
    return {k: (v[:n] if isinstance(v, (Tensor, list, tuple)) else v) for k, v in batch.items()}


def _batch_len(batch: dict) -> int:
    v = batch.get("video")
    if isinstance(v, Tensor):
        return int(v.shape[0])
    for v in batch.values():
        if isinstance(v, (Tensor, list, tuple)):
            return len(v)
    raise ValueError("cannot tell the batch size of a batch without tensors or lists")


class FVDCallback(Callback):
    """Logs FVD of generated samples every ``every_n_steps`` optimizer steps (MAGVIT / Latte / VideoPoet evals).

    Samples come from ``pl_module.generate(batch=..., num_samples=..., generator=...)`` (DEVELOPERS.md contract):
    with ``pass_batches`` (default: when the trainer has a validation loader) the validation batches are passed
    (class/text conditioning; a tokenizer reconstructs them, which gives reconstruction FVD), otherwise
    ``batch=None``. The generator is re-seeded each evaluation, so successive values compare the same noise.

    Real statistics come from ``real_stats_path`` (a cache made by ``vidgen fvd`` or by this callback), else from
    the first ``num_samples`` clips of ``real_shards`` (cached under ``~/.cache/vidgen/fvd``), else, with
    ``pass_batches``, from the validation batches' own videos (reconstruction FVD against the inputs).

    ``use_ema``: evaluate under EMA weights through the EMA callback's ``ema_weights(pl_module)`` context manager
    (when no such callback is present the raw weights are used, with a warning). Under DDP/FSDP every rank
    generates ``ceil(num_samples / world)`` clips and the metric sums statistics over ranks.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = FVD_NUM_SAMPLES,
        real_stats_path: str | None = None,
        real_shards: str | list[str] | None = None,
        i3d_path: str | None = None,
        use_ema: bool = True,
        batch_size: int = 8,
        seed: int = 0,
        pass_batches: bool | None = None,
        i3d_kind: str = "auto",
        log_name: str = "val/fvd",
        cache_dir: str | None = None,
    ):
        super().__init__()
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError("FVDCallback needs every_n_steps >= 1, num_samples >= 2 and batch_size >= 1")
        if i3d_path is None or not os.path.isfile(i3d_path):
            raise FileNotFoundError(
                f"FVDCallback: i3d_path {i3d_path!r} is not a file. Make it once with "
                "`vidgen convert-i3d --out i3d_k400.pt` (or pass a local StyleGAN-V i3d_torchscript.pt)")
        if real_stats_path and not os.path.isfile(real_stats_path) and not real_shards:
            raise FileNotFoundError(f"FVDCallback: real_stats_path {real_stats_path} does not exist and no "
                                    "real_shards are given to compute it; run `vidgen fvd --real SHARDS "
                                    f"--real-stats {real_stats_path}` or set real_shards")
        if real_shards is not None:
            expand_sources(real_shards)  # fail now on a bad pattern
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.real_stats_path, self.real_shards, self.i3d_path, self.i3d_kind = (real_stats_path, real_shards,
                                                                                i3d_path, i3d_kind)
        self.use_ema, self.pass_batches, self.log_name, self.cache_dir = use_ema, pass_batches, log_name, cache_dir
        self.metric: FrechetVideoDistance | None = None
        self.last_value: float | None = None
        self._last_step = -1
        self._warned: set[str] = set()

    # -- hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            values = self.evaluate(trainer, pl_module)
            for name, value in (values.items() if isinstance(values, dict) else [(self.log_name, values)]):
                pl_module.log(name if "/" in name else f"val/{name}", value, on_step=True, on_epoch=False,
                              sync_dist=False)

    # -- work
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=3)

    def _ensure_metric(self, pl_module) -> FrechetVideoDistance:
        if self.metric is None:
            from vidgen.lightning_modules.nn.i3d import load_i3d

            # not a submodule of pl_module: never checkpointed, never sharded
            self.metric = FrechetVideoDistance(load_i3d(self.i3d_path, kind=self.i3d_kind))
        return self.metric.to(pl_module.device)

    def _val_loader(self, trainer):
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_dataloader"):
            with contextlib.suppress(Exception):
                loader = dm.val_dataloader()
                if loader is not None and not (isinstance(loader, (list, tuple)) and not loader):
                    return loader[0] if isinstance(loader, (list, tuple)) else loader
        loaders = getattr(trainer, "val_dataloaders", None)
        if isinstance(loaders, (list, tuple)):
            return loaders[0] if loaders else None
        return loaders

    def _ema_context(self, trainer, pl_module):
        if self.use_ema:
            for cb in trainer.callbacks:
                fn = getattr(cb, "ema_weights", None)
                if callable(fn) and cb is not self:
                    return fn(pl_module)
            self._warn_once("ema", "FVDCallback(use_ema=True) found no EMA callback with ema_weights(pl_module); "
                                   "evaluating the raw weights")
        return contextlib.nullcontext()

    def _batches(self, trainer, pl_module, quota: int) -> Iterator[tuple[dict | None, int]]:
        use = self.pass_batches
        loader = self._val_loader(trainer) if use is not False else None
        if use and loader is None:
            raise ValueError("FVDCallback(pass_batches=True) needs a validation dataloader (data.val_shards)")
        if loader is None:
            while quota > 0:
                n = min(self.batch_size, quota)
                yield None, n
                quota -= n
            return
        from lightning.fabric.utilities.apply_func import move_data_to_device

        passes = 0
        while quota > 0:
            passes += 1
            got = False
            for batch in loader:
                batch = {k: v for k, v in dict(batch).items() if k != "_state"}
                batch = _slice_batch(batch, min(_batch_len(batch), quota))
                n = _batch_len(batch)
                got = True
                yield move_data_to_device(batch, pl_module.device), n
                quota -= n
                if quota <= 0:
                    return
            if not got:
                raise ValueError("FVDCallback: the validation dataloader is empty")
            if passes == 1:
                self._warn_once("cycle", "FVDCallback: the validation set has fewer clips than num_samples / world; "
                                         "cycling it (repeated conditions)")

    def _real_stats(self, trainer, metric: FrechetFeatureDistance) -> bool:
        """Load/compute fixed real statistics (of ``metric``'s protocol); False when real features come from the
        batches."""
        if metric.fixed_real is not None:
            return True
        ext = extractor_id(metric.extractor)
        if self.real_stats_path and os.path.isfile(self.real_stats_path):
            stats = FeatureStats.load(self.real_stats_path)
            _check_meta(stats, Path(self.real_stats_path), self.num_samples, ext, metric.protocol)
        elif self.real_shards is not None:
            path = self.real_stats_path or real_stats_path(self.real_shards, self.num_samples, ext, self.cache_dir,
                                                           protocol=metric.protocol)
            stats = compute_real_stats(self.real_shards, metric, self.num_samples, self.batch_size,
                                       metric.real_sum.device, cache=path)
            trainer.strategy.barrier("fvd_real_stats")
        else:
            return False
        metric.set_real_stats(stats)
        return True

    def _samples(self, trainer, pl_module) -> Iterator[tuple[dict | None, Tensor, Tensor]]:
        """``(batch, videos, global sample indices)``: this rank's ``ceil(num_samples / world)`` clips from
        ``pl_module.generate`` in eval mode under the EMA weights, with a generator re-seeded per evaluation.
        Rows of a validation batch marked ``valid`` False (DDP padding) are generated but not yielded, so neither
        side of a metric counts them (the quota counts generated rows: every rank makes the same calls).

        The one sampling loop of every evaluation callback (FVD here, IS / CLIPSIM / FID / accuracy in
        :class:`vidgen.callbacks.metrics.EvalCallback`); global index ``i * world + rank`` for the i-th local clip."""
        world, rank = trainer.world_size, trainer.global_rank
        quota = math.ceil(self.num_samples / world)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + 1_000_003 * rank)
        was_training = pl_module.training
        pl_module.eval()
        done = 0
        try:
            with torch.no_grad(), self._ema_context(trainer, pl_module):
                for batch, n in self._batches(trainer, pl_module, quota):
                    video = pl_module.generate(batch=batch, num_samples=n, generator=generator)
                    index = torch.arange(done, done + n) * world + rank
                    done += n
                    valid = valid_rows(batch)
                    if valid is not None and not bool(valid[:n].all()):  # DDP padding: generated (every rank runs
                        # the same generate() calls), never scored nor taken as real clips
                        valid = valid[:n]
                        batch, video, index = keep_valid(batch, valid), video[valid.to(video.device)], index[valid]
                        if not len(index):
                            continue
                    yield batch, video, index
        finally:
            pl_module.train(was_training)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> float:
        """Generate this rank's share of ``num_samples`` clips and return FVD (the same value on every rank)."""
        metric = self._ensure_metric(pl_module)
        metric.reset()
        fixed_real = self._real_stats(trainer, metric)
        if not fixed_real and self.pass_batches is False:
            raise ValueError("FVDCallback has no real statistics: set real_stats_path or real_shards")
        for batch, video, _ in self._samples(trainer, pl_module):
            if batch is None and not fixed_real:
                raise ValueError("FVDCallback: without real statistics the validation batches are needed")
            metric.update(video, real=False)
            if not fixed_real:
                metric.update(batch["video"], real=True)
        self.last_value = value = float(metric.compute())
        return value
