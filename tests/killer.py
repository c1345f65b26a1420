"""Test-only callback: deliver a real signal to this process at a given step (rank 0 only by default)."""

import os
import signal

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    def __init__(self, step: int, signame: str = "SIGTERM", rank: int = 0):
        self.step, self.signame, self.rank = step, signame, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.signame))
