"""StreamProbe: a tiny per-frame conv autoencoder that checks a data pipeline end to end.

Not a paper model.  It trains (the reconstruction loss drops), exposes ``generate()`` like every model of the suite,
and can append the sample keys it consumed to a file, one line per step and rank — which is how the exact-resume
tests compare an interrupted run with an uninterrupted one.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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
                f.write(json.dumps({"step": self.global_step, "keys": list(batch["key"])}) + "\n")
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.mse_loss(self(batch["video"]), batch["video"]), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", F.mse_loss(self(batch["video"]), batch["video"]), sync_dist=True)

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
    def read_keys(path: str, rank: int = 0) -> list[list[str]]:
        p = f"{path}.rank{rank}"
        if not os.path.exists(p):
            return []
        with open(p) as f:
            return [json.loads(line)["keys"] for line in f if line.strip()]
