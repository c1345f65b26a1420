"""``VideoSampleLogger``: periodic samples from a fixed seed and a fixed conditioning batch, so that runs can be
compared over time (same seed + same weights -> the same pixels).

Every ``every_n_steps`` optimizer steps it calls the model's contract method
``generate(batch=fixed_batch, num_samples=n, generator=torch.Generator().manual_seed(seed))`` (eval mode, no grad,
the trainer's precision context, EMA weights when ``vidgen.callbacks.ema`` is in use and ``use_ema``) and writes, on global
rank 0 only:

* ``<run dir>/<out_subdir>/step{N:08d}.mp4`` -- the batch tiled into one video (``vidgen.datamodules.media.save_video_grid_mp4``);
* ``<run dir>/<out_subdir>/step{N:08d}.png`` -- one row of frames per sample (``vidgen.datamodules.media.write_grid_png``);
* a TensorBoard video ``samples/video`` at step N: ``SummaryWriter.add_video`` when moviepy (with ``moviepy.editor``,
  i.e. moviepy < 2) is installed; otherwise the same kind of summary (an animated GIF image) is encoded with PIL
  here, which TensorBoard shows identically -- moviepy is not needed.

The run directory is ``trainer.default_root_dir`` (what ``vidgen fit`` sets to ``runs/<name>``).

The conditioning batch (``conditioning``): ``"val"`` -- the first validation batch (deterministic: center crops,
fixed order; the same after a resume); ``"train"`` -- the first training batch this process sees; ``"auto"`` -- val
when the datamodule has validation data, else train. It is cut to ``num_samples`` and cached on CPU.

Distributed: every rank calls ``generate`` (an FSDP2-sharded model needs all ranks in the forward; ``generate`` is
registered as an FSDP forward method by ``vidgen.parallel``); only global rank 0 writes. Under DDP each rank
conditions on its own first batch; rank 0's is written.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["VideoSampleLogger", "trim_batch", "batch_to"]


def trim_batch(batch: Any, n: int | None) -> Any:
    """The first ``n`` samples of a batch dict (tensors and lists cut on dim 0)."""
    if n is None:
        return batch
    if isinstance(batch, dict):
        return {k: trim_batch(v, n) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() > 0 else batch
    if isinstance(batch, list):
        return batch[:n]
    if isinstance(batch, tuple):
        return tuple(trim_batch(v, n) for v in batch)
    return batch


def batch_to(batch: Any, device) -> Any:
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.detach().to(device)
    if isinstance(batch, tuple):
        return tuple(batch_to(v, device) for v in batch)
    return batch


def _moviepy_ok() -> bool:
    try:
        from moviepy import editor  # noqa: F401  (what torch.utils.tensorboard's add_video imports)
    except Exception:
        return False
    return True


def _gif_bytes(grid, fps: float) -> bytes:
    """uint8 ``[T, H, W, 3]`` -> animated GIF bytes (what TensorBoard's add_video stores)."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in grid]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                   duration=max(1, int(round(1000.0 / fps))), loop=0)
    return buf.getvalue()


def tb_add_video(writer, tag: str, videos: torch.Tensor, step: int, fps: float) -> str:
    """Write ``videos`` ``[B, C, T, H, W]`` in [-1, 1] as a TensorBoard video summary; returns the method used."""
    if _moviepy_ok():
        v01 = ((videos.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [N, T, C, H, W]
        writer.add_video(tag, v01, step, fps=fps)
        return "add_video"
    from tensorboard.compat.proto.summary_pb2 import Summary

    from vidgen.datamodules.media import make_video_grid

    grid = make_video_grid(videos)  # [T, H, W, 3] uint8, the batch tiled
    img = Summary.Image(height=grid.shape[1], width=grid.shape[2], colorspace=3,
                        encoded_image_string=_gif_bytes(grid, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)
    return "gif"


class VideoSampleLogger(Callback):
    """Samples every ``every_n_steps`` from a fixed seed and conditioning batch -> mp4 + png + TensorBoard.

    Args:
        every_n_steps: optimizer steps between samples (``trainer.global_step`` crossing a multiple).
        num_samples: samples per log (the conditioning batch is cut to this many).
        fps: frame rate of the mp4 / TensorBoard video.
        seed: the generator seed, the same at every log.
        use_ema: sample with the EMA weights (``vidgen.callbacks.ema.ema_weights``) when the model has them.
        out_subdir: folder under the run directory.
        conditioning: auto | val | train (see module docstring).
        log_at_start: also sample before the first step (step 0, fresh runs only).
    """

    def __init__(self, every_n_steps: int, num_samples: int = 4, fps: float = 8, seed: int = 0, use_ema: bool = True,
                 out_subdir: str = "samples", conditioning: str = "auto", log_at_start: bool = False):
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"VideoSampleLogger every_n_steps must be a positive integer, got {every_n_steps!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"VideoSampleLogger num_samples must be a positive integer, got {num_samples!r}")
        if not fps or fps <= 0:
            raise ValueError(f"VideoSampleLogger fps must be positive, got {fps!r}")
        if conditioning not in ("auto", "val", "train"):
            raise ValueError(f"VideoSampleLogger conditioning must be auto, val or train, got {conditioning!r}")
        self.every_n_steps, self.num_samples, self.fps, self.seed = every_n_steps, num_samples, float(fps), int(seed)
        self.use_ema, self.out_subdir, self.conditioning = use_ema, out_subdir, conditioning
        self.log_at_start = log_at_start
        self._batch: Any = None            # cached conditioning batch (CPU)
        self._source: str | None = None    # where it came from: val | train
        self._last_bucket: int | None = None
        self.last_paths: dict[str, str] = {}
        self.tb_method: str | None = None

    # ------------------------------------------------------------------ conditioning batch
    def _val_batch(self, trainer) -> Any:
        dm = trainer.datamodule
        loader = None
        if dm is not None and hasattr(dm, "val_dataloader"):
            try:
                loader = dm.val_dataloader()
            except Exception as e:  # noqa: BLE001 - no validation data is a normal case for "auto"
                if self.conditioning == "val":
                    raise
                warnings.warn(f"VideoSampleLogger: no validation batch ({e}); conditioning on the first train batch")
                return None
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            return None
        it = iter(loader)
        try:
            batch = next(it)
        except StopIteration:
            return None
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if isinstance(batch, dict):
            batch.pop("_state", None)
        return batch

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_bucket = trainer.global_step // self.every_n_steps
        if self._batch is None and self.conditioning in ("auto", "val"):
            b = self._val_batch(trainer)
            if b is None and self.conditioning == "val":
                raise ValueError("VideoSampleLogger(conditioning='val') needs validation data (data.val_shards)")
            if b is not None:
                self._batch, self._source = batch_to(trim_batch(b, self.num_samples), "cpu"), "val"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._batch is None:
            self._batch, self._source = batch_to(trim_batch(batch, self.num_samples), "cpu"), "train"
            if self.log_at_start and trainer.global_step == 0:
                self.log_samples(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bucket = trainer.global_step // self.every_n_steps
        if self._last_bucket is not None and bucket <= self._last_bucket:
            return
        self._last_bucket = bucket
        self.log_samples(trainer, pl_module, trainer.global_step)

    # ------------------------------------------------------------------ sampling
    def generate(self, trainer, pl_module) -> torch.Tensor:
        """Run ``pl_module.generate`` on the cached batch with the fixed seed (all ranks)."""
        if self._batch is None:
            raise RuntimeError("VideoSampleLogger has no conditioning batch yet")
        try:
            from vidgen.callbacks.ema import ema_weights
        except ImportError:  # pragma: no cover - EMA is part of the suite
            ema_weights = None
        batch = batch_to(self._batch, pl_module.device)
        gen = torch.Generator().manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        try:
            ema_ctx = ema_weights(pl_module, enabled=self.use_ema) if ema_weights is not None else _null()
            # the global RNG streams are left as they were: logging samples never changes the training run
            devices = [pl_module.device] if pl_module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad(), ema_ctx, \
                    trainer.precision_plugin.forward_context():
                videos = pl_module.generate(batch=batch, num_samples=self.num_samples, generator=gen)
        finally:
            pl_module.train(was_training)
        if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
            raise ValueError(f"{type(pl_module).__name__}.generate must return videos [B, C, T, H, W], got "
                             f"{getattr(videos, 'shape', type(videos))}")
        return videos.detach().float().clamp(-1, 1).cpu()

    def log_samples(self, trainer, pl_module, step: int) -> dict[str, str]:
        videos = self.generate(trainer, pl_module)
        if not trainer.is_global_zero:
            return {}
        from vidgen.datamodules.media import save_video_grid_mp4, write_grid_png

        out = os.path.join(trainer.default_root_dir, self.out_subdir)
        os.makedirs(out, exist_ok=True)
        stem = os.path.join(out, f"step{step:08d}")
        paths = {"mp4": save_video_grid_mp4(stem + ".mp4", videos, fps=self.fps),
                 "png": write_grid_png(stem + ".png", videos)}
        for lg in trainer.loggers:
            if not isinstance(lg, TensorBoardLogger):
                continue
            writer = lg.experiment
            if writer is not None and hasattr(writer, "add_video") and hasattr(writer, "_get_file_writer"):
                method = tb_add_video(writer, "samples/video", videos, step, self.fps)
                if self.tb_method is None and method == "gif":
                    rank_zero_info("VideoSampleLogger: moviepy<2 not installed; TensorBoard videos are GIFs encoded "
                                   "with PIL (same display as add_video)")
                self.tb_method = method
        self.last_paths = paths
        return paths

    # ------------------------------------------------------------------ state (the cached batch is not saved:
    # with conditioning='val' it is the same after resume; with 'train' it is the first batch after resume)
    def state_dict(self) -> dict:
        return {"seed": self.seed, "source": self._source}


class _null:
    def __enter__(self):
        return False

    def __exit__(self, *a):
        return False
