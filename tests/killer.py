"""Test-only callbacks: deliver a real signal at a given step, to this process (rank 0 only by default) or to its
whole process group (as SLURM and ``scancel`` do, DataLoader workers included)."""

import os
import signal
import time

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    def __init__(self, step: int, signame: str = "SIGTERM", rank: int = 0, group: bool = False):
        self.step, self.signame, self.rank, self.group = step, signame, rank, group

    def _send(self):
        sig = getattr(signal, self.signame)
        if self.group:
            os.killpg(os.getpgid(0), sig)
        else:
            os.kill(os.getpid(), sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            self._send()


class SignalInValidation(SignalAtStep):
    """Signal during the validation that follows step ``step`` (at its first batch); every validation batch then
    takes ``delay`` seconds and is counted in ``<log>`` so a test can see validation was cut short."""

    def __init__(self, step: int, log: str, delay: float = 1.0, signame: str = "SIGTERM", group: bool = True):
        super().__init__(step, signame, 0, group)
        self.path, self.delay = log, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {batch_idx}\n")
        if trainer.global_step == self.step and batch_idx == 0:
            self._send()
        time.sleep(self.delay)


class RaiseAtStep(Callback):
    """A crash in training code (the DataLoader iterator is left to the exception's traceback)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash requested by the test")
