"""``PredictionWriter``: the one place that turns what ``predict_step`` returns into files (Lightning's
``BasePredictionWriter`` convention; models write nothing).

``predict_step`` returns a dict (DEVELOPERS.md)::

    {"videos": float [B, C, T, H, W] in [-1, 1], "keys": list[str],
     optional "labels": int64 [B], "captions": list[str], "cond_videos": [B', C, T, H, W] (the conditioning, shown
     above the samples in the grid), "audio": [B, 1, S] with "sample_rate", "trajectories": float [B, N, T, 2]
     (x, y pixels per frame; NaN rows pad; drawn over the samples in the grid), "task": str, any other [B, ...] tensor}

Per batch (every rank writes its own samples; file names carry the key, grids the rank; the rows of an eval batch's
DDP padding, ``batch["valid"]`` False, are dropped first, :func:`real_rows`):

* ``<out>/<key>.mp4`` per sample (``<key>.png`` for a single frame), ``<key>.wav`` when there is audio (also muxed
  into the mp4);
* ``<out>/grid_r<rank>_<batch>.png`` (one row per sample, conditioning rows first; requested trajectories drawn over
  their samples) and ``.mp4`` (the batch tiled);

At the end of the predict epoch ``<out>/samples.npz`` (``samples_r<rank>.npz`` per rank when distributed):
``videos`` uint8 ``[N, T, H, W, 3]``, ``keys``, and whatever conditioning came with them (``labels`` int64,
``captions``, ``cond_videos`` uint8, ``audio`` float32 + ``sample_rate``, ``trajectories`` float32, other per-sample
arrays as they are; the per-sample files and ``videos`` stay undrawn).

``<out>`` is ``output_dir`` or ``<run dir>/predictions`` (``trainer.default_root_dir``; ``vidgen predict`` gives each
predict run its own folder there).  A recipe configures it under ``trainer.callbacks``; ``vidgen predict`` adds one
when the recipe has none.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from vidgen.datamodules import media
from vidgen.lightning_modules.nn.batches import keep_valid, valid_rows
from vidgen.lightning_modules.nn.trajectory import draw_trajectories

__all__ = ["PredictionWriter", "check_prediction", "real_rows", "write_wav"]

#: keys of the prediction dict with a meaning of their own (everything else with a batch dim goes to samples.npz)
KNOWN_KEYS = ("videos", "keys", "labels", "captions", "cond_videos", "audio", "sample_rate", "task")


def check_prediction(pred: Any) -> dict:
    """The prediction dict of one batch, checked against the contract (a clear error names what is wrong)."""
    if not isinstance(pred, dict) or "videos" not in pred:
        raise TypeError(f"predict_step must return a dict with 'videos' [B, C, T, H, W] in [-1, 1] and 'keys' "
                        f"(DEVELOPERS.md), got {type(pred).__name__}"
                        + (f" with keys {sorted(pred)}" if isinstance(pred, dict) else ""))
    v = pred["videos"]
    if not isinstance(v, torch.Tensor) or v.ndim != 5:
        raise ValueError(f"prediction 'videos' must be a tensor [B, C, T, H, W], got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    b = v.shape[0]
    keys = list(pred.get("keys") or [])
    if keys and len(keys) != b:
        raise ValueError(f"prediction has {b} videos but {len(keys)} keys")
    for k in ("labels", "captions", "audio"):
        if pred.get(k) is not None and len(pred[k]) != b:
            raise ValueError(f"prediction has {b} videos but {len(pred[k])} {k}")
    if pred.get("audio") is not None and not pred.get("sample_rate"):
        raise ValueError("prediction 'audio' needs 'sample_rate'")
    return pred


def real_rows(pred: dict, batch: Any) -> dict:
    """``pred`` without the rows of the eval batch's DDP padding (``batch["valid"]`` False; row ``i`` of the
    prediction is row ``i`` of the batch): a padded clip repeats a real one, and would be written twice under its key."""
    valid = valid_rows(batch)
    if valid is None or bool(valid.all()):
        return pred
    b = pred["videos"].shape[0]
    if b > len(valid):
        raise ValueError(f"prediction has {b} videos for a batch of {len(valid)} rows with padding (valid False): "
                         "predict_step must return row i for the batch's row i")
    return dict(keep_valid(pred, valid[:b]))


def _safe(key: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key)).strip("._") or "sample"


def write_wav(path: str, audio: Any, sample_rate: int) -> str:
    """Mono/multi-channel float audio ``[C, S]`` in [-1, 1] -> 16-bit PCM wav."""
    media.atomic_write(path, media.encode_audio_wav(audio, int(sample_rate)))
    return path


class PredictionWriter(BasePredictionWriter):
    """Write predictions (see the module docstring).

    Args:
        output_dir: folder for the files (default ``<run dir>/predictions``).
        fps: frame rate of the written videos.
        per_sample: one video (png for a frame) per sample.
        grids: a PNG + mp4 grid per batch.
        npz: ``samples.npz`` at the end.
        max_grid_frames: frames per row of the PNG grid.
    """

    def __init__(self, output_dir: str | None = None, fps: float = 8.0, per_sample: bool = True, grids: bool = True,
                 npz: bool = True, max_grid_frames: int = 8):
        super().__init__(write_interval="batch")
        if not fps > 0:
            raise ValueError(f"PredictionWriter fps must be > 0, got {fps}")
        self.output_dir, self.fps = output_dir, float(fps)
        self.per_sample, self.grids, self.npz, self.max_grid_frames = per_sample, grids, npz, int(max_grid_frames)
        self._rows: dict[str, list] = {}
        self.written: list[str] = []

    def out_dir(self, trainer) -> str:
        return self.output_dir or os.path.join(trainer.default_root_dir, "predictions")

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._rows, self.written = {}, []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        pred = real_rows(check_prediction(prediction), batch)
        videos = pred["videos"].detach().float().cpu()
        b = videos.shape[0]
        if b == 0:  # a batch of DDP padding only
            return
        root = self.out_dir(trainer)
        os.makedirs(root, exist_ok=True)
        rank = trainer.global_rank
        keys = [_safe(k) for k in (pred.get("keys") or [f"r{rank}_{batch_idx:05d}_{i:03d}" for i in range(b)])]
        if self.per_sample:
            for i, key in enumerate(keys):
                v = videos[i]
                if v.shape[1] == 1:
                    self.written.append(media.write_grid_png(os.path.join(root, f"{key}.png"), v[None], padding=0))
                else:  # a soundtrack (v2a, a2v, audio tokenizers) is muxed into the mp4 as well as written as wav
                    sound = pred["audio"][i] if pred.get("audio") is not None else None
                    self.written.append(media.write_video(os.path.join(root, f"{key}.mp4"), v, fps=self.fps,
                                                          layout="cthw", audio=sound,
                                                          sample_rate=pred.get("sample_rate")))
                if pred.get("audio") is not None:
                    self.written.append(write_wav(os.path.join(root, f"{key}.wav"), pred["audio"][i],
                                                  int(pred["sample_rate"])))
        if self.grids:
            grid = videos
            trajs = pred.get("trajectories")
            if isinstance(trajs, torch.Tensor) and trajs.ndim == 4 and trajs.shape[0] == b:  # Tora: the requested paths
                grid = torch.stack([draw_trajectories(videos[i], trajs[i]) for i in range(b)])
            cond = pred.get("cond_videos")
            if isinstance(cond, torch.Tensor) and cond.ndim == 5 and cond.shape[1:] == videos.shape[1:]:
                grid = torch.cat([cond.detach().float().cpu(), grid])
            stem = os.path.join(root, f"grid_r{rank}_{batch_idx:05d}")
            self.written.append(media.write_grid_png(stem + ".png", grid, max_frames=self.max_grid_frames))
            if videos.shape[2] > 1:
                self.written.append(media.save_video_grid_mp4(stem + ".mp4", grid, fps=self.fps, nrow=b))
        if self.npz:
            self._collect(pred, videos, keys)

    def _collect(self, pred: dict, videos: torch.Tensor, keys: list[str]) -> None:
        b = videos.shape[0]
        rows = self._rows
        rows.setdefault("videos", []).append(media.to_uint8(videos.permute(0, 2, 3, 4, 1).numpy()))
        if videos.shape[1] == 1:
            rows["videos"][-1] = np.repeat(rows["videos"][-1], 3, axis=-1)
        rows.setdefault("keys", []).append(np.asarray(keys, dtype=str))
        for k, v in pred.items():
            if k in ("videos", "keys", "sample_rate", "task") or v is None:
                continue
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b:
                a = v.detach().cpu()
                if k == "cond_videos" and a.ndim == 5:
                    a = media.to_uint8(a.float().permute(0, 2, 3, 4, 1).numpy())
                else:
                    a = a.float().numpy() if a.is_floating_point() else a.numpy()
                rows.setdefault(k, []).append(a)
            elif isinstance(v, (list, tuple)) and len(v) == b and all(isinstance(x, str) for x in v):
                rows.setdefault(k, []).append(np.asarray(v, dtype=str))
        if pred.get("sample_rate"):
            rows["sample_rate"] = [np.asarray([int(pred["sample_rate"])])]
        if pred.get("task"):
            rows["task"] = [np.asarray([str(pred["task"])])]

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not self.npz or not self._rows:
            return
        n = sum(len(x) for x in self._rows["videos"])
        arrays = {}
        for k, parts in self._rows.items():
            if k in ("sample_rate", "task"):
                arrays[k] = parts[-1]
            elif sum(len(p) for p in parts) == n and all(p.shape[1:] == parts[0].shape[1:] for p in parts):
                arrays[k] = np.concatenate(parts)
        name = "samples.npz" if trainer.world_size == 1 else f"samples_r{trainer.global_rank}.npz"
        path = os.path.join(self.out_dir(trainer), name)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        media.atomic_write(path, buf.getvalue())
        self.written.append(path)
        self._rows = {}
