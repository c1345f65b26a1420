"""StreamProbe: a tiny per-frame conv autoencoder that checks a data pipeline end to end.

Not a paper model.  It trains (the reconstruction loss drops), exposes ``generate()`` like every model of the suite,
and can append the sample keys it consumed, with a hash of the batch's video, to a file, one line per step and rank —
which is how the exact-resume tests compare an interrupted run with an uninterrupted one (the same samples, and the
same crops, offsets and flips of them). Its val/test loss averages over real clips only (``batch["valid"]``).
"""

from __future__ import annotations

import hashlib
import json
import os

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vidgen.lightning_modules.nn.batches import eval_rows
from vidgen.lightning_modules.nn.step_logs import log_step


class StreamProbe(L.LightningModule):
    fsdp_block_classes = (nn.Conv2d, nn.ConvTranspose2d)  # so the probe also exercises the FSDP2 path

    def __init__(self, channels: int = 8, lr: float = 3e-3, keys_log: str | None = None, num_frames: int | None = None,
                 resolution: int | list[int] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.enc = nn.Conv2d(3, channels, 4, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(channels, 3, 4, stride=2, padding=1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        x = rearrange(video, "b c t h w -> (b t) c h w")
        y = self.dec(F.silu(self.enc(x)))
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch["video"]), batch["video"])
        log_step(self, {"train/loss": loss}, batch["video"].shape[0])
        if self.hparams.keys_log:
            with open(f"{self.hparams.keys_log}.rank{self.global_rank}", "a") as f:
                f.write(json.dumps({"step": self.global_step, "keys": list(batch["key"]),
                                    "video": video_hash(batch["video"])}) + "\n")
        return loss

    def eval_loss(self, batch) -> tuple[torch.Tensor, int]:
        """Mean reconstruction error over the real clips of an eval batch (padding, ``valid`` False, dropped), and
        their number."""
        batch, n = eval_rows(batch)  # a batch of padding only: one row, returned with n = 0 (weight 0)
        video = batch["video"]
        err = F.mse_loss(self(video), video, reduction="none").mean(dim=(1, 2, 3, 4))
        return err.mean(), n

    def validation_step(self, batch, batch_idx):
        loss, n = self.eval_loss(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=n)  # epoch mean weighted by real clips, over ranks

    def test_step(self, batch, batch_idx):
        loss, n = self.eval_loss(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=n)

    def predict_step(self, batch, batch_idx):
        return {"videos": self.generate(batch), "keys": list(batch["key"])}

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None, generator=None) -> torch.Tensor:
        if batch is None:
            raise ValueError("StreamProbe reconstructs a batch; pass batch=")
        video = batch["video"][:num_samples] if num_samples else batch["video"]
        return self(video).clamp(-1, 1)

    def configure_optimizers(self):
        from .nn.optim import cpu_multi_tensor

        return cpu_multi_tensor(torch.optim.Adam(self.parameters(), lr=self.hparams.lr))

    @staticmethod
    def read_log(path: str, rank: int = 0) -> list[dict]:
        """The ``keys_log`` lines of ``rank``: ``{"step", "keys", "video"}`` (the video's content hash) per step."""
        p = f"{path}.rank{rank}"
        if not os.path.exists(p):
            return []
        with open(p) as f:
            return [json.loads(line) for line in f if line.strip()]

    @staticmethod
    def read_keys(path: str, rank: int = 0) -> list[list[str]]:
        return [r["keys"] for r in StreamProbe.read_log(path, rank)]

    @staticmethod
    def read_video_hashes(path: str, rank: int = 0) -> list[str]:
        return [r["video"] for r in StreamProbe.read_log(path, rank)]


def video_hash(video: torch.Tensor) -> str:
    """Content hash of a batch's video (shape, dtype and values), to compare two runs' streams step by step."""
    v = video.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(v.shape)} {v.dtype}".encode())
    h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    return h.hexdigest()[:16]
