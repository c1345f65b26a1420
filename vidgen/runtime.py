"""Run-time pieces every run gets: atomic checkpoint writes and checkpoint-then-exit on preemption signals."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write ``<path>.tmp-<pid>``, fsync, then rename over ``<path>``: a kill mid-save never leaves a broken file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = str(path)
        fs = get_filesystem(path)
        if "://" in path and not path.startswith("file://"):  # remote stores have their own atomic semantics
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory = os.path.dirname(os.path.abspath(path))
        fs.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGUSR1: finish the current step, save ``last.ckpt`` and stop; the process then exits 0.

    The flag is combined over ranks every step (one scalar all-reduce), so all ranks stop at the same step even when
    only one was signalled.  A SLURM script can requeue the job on exit (see configs/trainer/slurm.yaml)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, ckpt_path: str):
        self.ckpt_path = ckpt_path
        self.flag = False
        self._previous: dict[int, Any] = {}
        self.preempted = False

    def _handler(self, signum, frame):
        log.warning("received signal %s: saving a checkpoint at the end of this step, then exiting", signum)
        self.flag = True
        self.signum = signum

    def on_train_start(self, trainer, pl_module):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _any_rank(self, trainer) -> bool:
        flag = self.flag
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._any_rank(trainer) and not self.preempted:
            self.preempted = True
            trainer.save_checkpoint(self.ckpt_path)
            if trainer.is_global_zero:
                print(f"[vidgen] preempted: saved {self.ckpt_path} at step {trainer.global_step}; exiting 0", flush=True)
                self._maybe_requeue(trainer)
            trainer.should_stop = True

    @staticmethod
    def _maybe_requeue(trainer):
        """Under ``SLURMEnvironment(auto_requeue=True)`` (configs/trainer/slurm.yaml) requeue the job ourselves: this
        handler replaces Lightning's, which would save inside the signal handler (unsafe under FSDP/DDP)."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer.strategy.cluster_environment if hasattr(trainer.strategy, "cluster_environment") else None
        job = os.environ.get("SLURM_JOB_ID")
        if isinstance(env, SLURMEnvironment) and getattr(env, "auto_requeue", False) and job:
            import subprocess

            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            target = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else job
            rc = subprocess.call(["scontrol", "requeue", target])
            print(f"[vidgen] scontrol requeue {target} -> exit code {rc}", flush=True)


class RNGStateCheckpoint(Callback):
    """Saves every rank's python / numpy / torch (CPU and CUDA) RNG state and restores its own on resume.

    Lightning restores weights, optimizer and loops but not random state, so models that draw noise in their step
    (diffusion, masking ratios, dropout) would diverge from an uninterrupted run.  States are gathered to rank 0,
    because only rank 0 writes callback state."""

    @staticmethod
    def _local() -> dict:
        import random

        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types and tensors only: checkpoints are loaded with weights_only=True
        st = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(gauss)], "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        local = self._local()
        states = [local]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states = [None] * trainer.world_size
            dist.all_gather_object(states, local)
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        import random

        import numpy as np

        states = checkpoint.get("rng_states")
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: random state not restored",
                        len(states), trainer.world_size)
            return
        st = states[trainer.global_rank]
        random.setstate(st["python"])
        name, keys, pos, has_gauss, gauss = st["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])
