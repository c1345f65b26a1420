"""Run-time pieces every run gets: atomic checkpoint writes, checkpoint-then-exit on preemption signals, a
``last.ckpt`` that holds the end of the run, and the choice of a readable checkpoint to resume from."""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import signal
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

try:  # Lightning's "stop this run cleanly" exception: fit returns normally, without on_train_end or validation
    from lightning.pytorch.utilities.exceptions import _TunerExitException as _CleanExit
except ImportError:  # pragma: no cover - other Lightning versions: vidgen.cli catches Preempted itself
    _CleanExit = Exception

log = logging.getLogger(__name__)

from vidgen.lightning_modules.nn.checkpoint import TMP_MARK  # noqa: E402  <name>.tmp-<pid>-<random>: being written


class Preempted(_CleanExit):
    """Raised after the preemption checkpoint is saved: ends ``fit`` at once (no validation, no further steps)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write ``<path>.tmp-<pid>-<random>``, fsync, then rename over ``<path>``: a kill mid-save never leaves a broken
    file. The file gets the mode ``torch.save`` would give it (0666 minus the umask), so shared run directories
    work. Loading is weights-only with the allow-list of :mod:`vidgen.lightning_modules.nn.checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):  # remote stores have their own atomic semantics
            return super().save_checkpoint(checkpoint, path, storage_options)
        from vidgen.lightning_modules.nn.checkpoint import atomic_write

        atomic_write(path.removeprefix("file://"), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        from vidgen.lightning_modules.nn.checkpoint import ALLOWED_GLOBALS

        if weights_only is False:  # asked for explicitly by the caller
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def remove_stale_temporaries(ckpt_dir: str) -> list[str]:
    """Delete checkpoint temporaries a killed save left in ``ckpt_dir`` (this run's directory only).

    Call it before this run saves anything: every ``*.tmp-*`` file there belongs to a writer that no longer runs."""
    removed = []
    for p in sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), f"*{TMP_MARK}*"))):
        if os.path.isfile(p) and not os.path.islink(p):
            os.remove(p)
            removed.append(p)
    for p in sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), "*.ckpt.tmp"))):  # sharded (DCP) temporaries
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def checkpoint_readable(path: str) -> str | None:
    """None when ``path`` loads (weights-only, memory-mapped: nothing big is read), else why not."""
    if os.path.isdir(path):  # a sharded checkpoint: complete once its metadata is written (it is renamed in last)
        return None if os.path.isfile(os.path.join(path, ".metadata")) else "no .metadata (incomplete sharded save)"
    from vidgen.lightning_modules.nn.checkpoint import ALLOWED_GLOBALS

    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not usable for resuming
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "not a Lightning checkpoint (no state_dict)"
    return None


def step_checkpoints(ckpt_dir: str) -> list[str]:
    """``step<N>.ckpt`` files (or sharded directories) of a run, newest step first."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(ckpt_dir), "step*.ckpt")):
        m = re.fullmatch(r"step(\d+)\.ckpt", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def resume_checkpoint(ckpt_dir: str, warn=print) -> str | None:
    """The checkpoint ``--ckpt_path last`` resumes: ``last.ckpt`` when it is readable, else the newest readable
    ``stepN.ckpt`` (with a warning naming both); None when the run has no checkpoint at all. Raises
    ``FileNotFoundError`` when checkpoints exist but none is readable."""
    last = os.path.join(ckpt_dir, "last.ckpt")
    candidates = ([last] if os.path.exists(last) else []) + step_checkpoints(ckpt_dir)
    if not candidates:
        return None
    problems = []
    for path in candidates:
        why = checkpoint_readable(path)
        if why is None:
            if problems:
                warn(f"[vidgen] WARNING: {problems[0][0]} is unreadable ({problems[0][1]}); resuming from {path}, "
                     "the newest readable step checkpoint, instead")
            return path
        problems.append((path, why))
    raise FileNotFoundError("--ckpt_path last: no readable checkpoint in " + ckpt_dir + ": "
                            + "; ".join(f"{os.path.basename(p)} ({w})" for p, w in problems))


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` holds the final state when ``fit`` ends (max_steps, max_epochs,
    early stopping): Lightning's skips the end-of-fit save once anything was saved, losing up to
    ``every_n_train_steps - 1`` steps."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            if self.save_last == "link":  # a link would point at an older step: write the file
                self.last_model_path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
                self._save_checkpoint(trainer, self.last_model_path)
            else:
                self._save_last_checkpoint(trainer, candidates)


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGUSR1: finish the current training step, save ``last.ckpt`` and stop; the process exits 0.

    A signal during validation stops validation at the end of the current validation batch and saves the state of
    the last finished training step, so the time from signal to exit is one step (or one validation batch) plus
    the save. The flag is combined over ranks (one scalar all-reduce per batch), so all ranks stop at the same batch
    even when only one was signalled. DataLoader workers ignore these signals (SLURM and ``scancel`` signal the
    whole process group) and die with the main process (see ``vidgen.datamodules.stream``). A SLURM script can
    requeue the job on exit (see configs/trainer/slurm.yaml)."""

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

    def _install(self):
        import threading

        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _restore(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_sanity_check_start(self, trainer, pl_module):
        self._install()

    def on_train_start(self, trainer, pl_module):
        self._install()

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _any_rank(self, trainer) -> bool:
        flag = self.flag
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _save_and_stop(self, trainer, where: str):
        self.preempted = True
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        if trainer.is_global_zero:
            print(f"[vidgen] preempted{where}: saved {self.ckpt_path} at step {trainer.global_step}; exiting 0",
                  flush=True)
            self._maybe_requeue(trainer)
        self._restore()
        raise Preempted()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.preempted and self._any_rank(trainer):
            self._save_and_stop(trainer, "")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not self.preempted and self._any_rank(trainer):
            self._save_and_stop(trainer, " during validation")

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


def run_layout(run_dir: str, callbacks: list | None = None) -> dict[str, Any]:
    """``Trainer`` arguments that give a run built in Python (the demo) the CLI's run layout: TensorBoard in
    ``<run_dir>/tb/``, ``<run_dir>/checkpoints/last.ckpt`` holding the final state (written atomically), nothing
    under ``lightning_logs/``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    last = LastCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), save_top_k=0, save_last=True,
                          every_n_epochs=0, enable_version_counter=False)
    return {"default_root_dir": run_dir, "callbacks": [*(callbacks or []), last], "plugins": [AtomicCheckpointIO()],
            "logger": TensorBoardLogger(save_dir=run_dir, name="", version="tb", default_hp_metric=False)}
