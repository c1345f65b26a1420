"""Exponential moving average of the weights -- the only EMA in vidgen.

Update (after the optimizer step that brings ``trainer.global_step`` to ``g``)::

    s = g - start_step                               # optimizer steps since EMA start
    g <= start_step              : ema <- w                       (EMA tracks the raw weights)
    s crosses a multiple of every_n_steps:
                                   ema <- d * ema + (1 - d) * w   (torch._foreach_lerp_, weight 1 - d)
    d = decay                                     if warmup_steps == 0
    d = decay * min(1, s / warmup_steps)          otherwise (linear ramp from 0: early EMA ~ raw weights)

The rule depends only on ``global_step``, which the checkpoint restores, so a resumed run performs the same
updates as an uninterrupted one. Only trainable parameters (``requires_grad``) are averaged; frozen parameters
and buffers are used as they are.

Where the EMA weights live: a non-trainable submodule ``pl_module._ema`` whose *buffers* mirror the parameter
tree, so the state_dict key of the EMA of parameter ``net.blocks.0.w`` is ``_ema.net.blocks.0.w``. The buffers
are created from the parameters after the strategy has wrapped/sharded them: under FSDP2 they are DTensors
with the parameter's sharding, are updated shard-locally (no gather per step) and are saved in the sharded DCP
checkpoint with the model; under DDP they are plain tensors that DDP does not broadcast. Being buffers, they are
never seen by ``pl_module.parameters()`` (the optimizer) nor by autograd. Callback ``state_dict`` (written by
rank 0 only) holds no tensors.

When they are created: in ``on_fit_start`` (after DDP wrapping / FSDP2 sharding) for a fresh run. When a
checkpoint is restored, the callback wraps ``trainer.strategy.load_checkpoint`` (from ``setup``, undone in
``teardown``) so the buffers exist exactly when the checkpoint has EMA entries: ModelParallelStrategy loads the
sharded weights inside that call (and only the keys the module has), DDP/single-device load the returned dict
afterwards. Without EMA entries the run resumes and the EMA starts from the restored weights (a warning).
The EMA has the parameters' dtype: fp32 under DDP with ``bf16-mixed`` and under FSDP2's bf16 policy (sharded
master weights stay fp32); with ``precision: bf16-true`` it would be bf16, too coarse for ``decay`` near 1.

Evaluation: validation/test/predict run with the EMA weights swapped in (``use_ema_for_eval=False`` to keep the
raw ones); other code uses ``with ema_weights(pl_module): ...`` or ``ema_callback.ema_weights(pl_module)``
(a no-op without EMA, re-entrant). Swapping copies shard-locally; FSDP2 modules are resharded first.

Loading elsewhere: a bare model (no EMA callback) loads a training checkpoint with ``ema_state_dict(ckpt)`` (EMA
weights under the model's own names) or ``raw_state_dict(ckpt)`` -- a strict ``load_state_dict`` of the whole
``state_dict`` would reject the ``_ema.*`` keys. ``vidgen export --ema`` writes the former to a file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

__all__ = ["EMA", "EMAShadow", "EMA_PREFIX", "ema_weights", "ema_state_dict", "raw_state_dict", "ema_decay"]

# the EMA key rule (EMA_PREFIX, ema_state_dict, raw_state_dict) and the EMA buffers live below models and callbacks
from vidgen.lightning_modules.nn.checkpoint import EMA_PREFIX, _model_state, ema_state_dict, raw_state_dict, safe_load  # noqa: E402
from vidgen.lightning_modules.nn.ema import EMAShadow, attach_ema, detach_ema, ema_weights  # noqa: E402
from vidgen.lightning_modules.nn.ema import ema_shadow as _shadow  # noqa: E402


def ema_decay(
    global_step: int, decay: float, warmup_steps: int = 0, start_step: int = 0
) -> float:
    """Decay used by the update that follows optimizer step ``global_step`` (see module docstring)."""
    s = global_step - start_step
    if s <= 0:
        return 0.0
    if warmup_steps <= 0:
        return float(decay)
    return float(decay) * min(1.0, s / warmup_steps)


# ---------------------------------------------------------------------------------------------------------
# checkpoint helpers
# ---------------------------------------------------------------------------------------------------------
def checkpoint_ema_names(path: Any) -> Optional[list[str]]:
    """Parameter names that have an EMA in the checkpoint at ``path`` (a file or a DCP directory).

    Reads only metadata for a DCP directory; memory-maps a file. ``None`` when the path cannot be inspected.
    """
    p = Path(str(path))
    try:
        if p.is_dir():
            from torch.distributed.checkpoint import FileSystemReader

            keys = FileSystemReader(str(p)).read_metadata().state_dict_metadata.keys()
            prefix = "state_dict." + EMA_PREFIX
            return [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        if p.is_file():
            ckpt = safe_load(p, mmap=True)
            return [k[len(EMA_PREFIX) :] for k in _model_state(ckpt) if k.startswith(EMA_PREFIX)]
    except Exception as err:  # pragma: no cover - unreadable/remote: let the strategy report it
        warnings.warn(f"EMA: could not inspect checkpoint {path}: {err}", stacklevel=2)
    return None


# ---------------------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------------------
class EMA(Callback):
    """Exponential moving average of the trainable weights (decay schedule: see the module docstring).

    Args:
        decay: target decay ``d`` (per update).
        warmup_steps: ``0``: constant decay; ``W > 0``: ``d * min(1, s / W)`` with ``s`` optimizer steps since start.
        every_n_steps: update once per ``every_n_steps`` optimizer steps (``decay`` applies per update).
        use_ema_for_eval: validation/test/predict (and FVD, sample logging) see the EMA weights.
        start_step: before this optimizer step the EMA equals the raw weights.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup_steps: int = 0,
        every_n_steps: int = 1,
        use_ema_for_eval: bool = True,
        start_step: int = 0,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        if every_n_steps < 1:
            raise ValueError(f"EMA every_n_steps must be >= 1, got {every_n_steps}.")
        if warmup_steps < 0 or start_step < 0:
            raise ValueError("EMA warmup_steps and start_step must be >= 0.")
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.every_n_steps = int(every_n_steps)
        self.use_ema_for_eval = bool(use_ema_for_eval)
        self.start_step = int(start_step)
        self._last_bucket: Optional[int] = None
        self._swapped_here = False
        self._orig_load_checkpoint: Any = None
        self._strategy: Any = None

    # -- schedule -------------------------------------------------------------------------------------
    def decay_at(self, global_step: int) -> float:
        return ema_decay(global_step, self.decay, self.warmup_steps, self.start_step)

    def _bucket(self, global_step: int) -> int:
        return (global_step - self.start_step) // self.every_n_steps

    def step(self, pl_module: nn.Module, global_step: int) -> bool:
        """Apply the update for optimizer step ``global_step`` if one is due; returns whether it updated."""
        shadow = _shadow(pl_module)
        if shadow is None:
            return False
        if global_step <= self.start_step:
            shadow.update(pl_module, 0.0)
            self._last_bucket = self._bucket(global_step)
            return True
        bucket = self._bucket(global_step)
        last = self._last_bucket if self._last_bucket is not None else self._bucket(global_step - 1)
        self._last_bucket = bucket
        if bucket <= last:
            return False
        shadow.update(pl_module, self.decay_at(global_step))
        return True

    def ema_weights(self, pl_module: nn.Module):
        """``with ema_cb.ema_weights(pl_module): ...`` -- the module-level :func:`ema_weights` (used by FVD)."""
        return ema_weights(pl_module)

    # -- attaching ------------------------------------------------------------------------------------
    attach = staticmethod(attach_ema)
    detach = staticmethod(detach_ema)

    def _names_for(self, pl_module: nn.Module, ckpt_names: list[str]) -> list[str]:
        params = dict(pl_module.named_parameters())
        unknown = [n for n in ckpt_names if n not in params]
        if unknown:
            warnings.warn(f"EMA: checkpoint EMA entries for unknown parameters are ignored: {unknown[:5]}", stacklevel=3)
        wanted = set(ckpt_names)
        return [n for n in params if n in wanted]  # parameter order

    def _wrap_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Create the EMA buffers right before the strategy restores a checkpoint, when it has EMA entries.

        Strategies that restore after setup (ModelParallelStrategy) load the weights inside ``load_checkpoint``
        (sharded: only keys present in the module are read), so the buffers must exist before the call and must
        not exist if the checkpoint lacks them. Others (DDP, single device) return the dict and load it later.
        """
        strategy = trainer.strategy
        if self._orig_load_checkpoint is not None:
            return
        orig = strategy.load_checkpoint
        callback = self

        def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            if strategy.restore_checkpoint_after_setup:
                names = checkpoint_ema_names(checkpoint_path)
                if names:
                    callback.attach(pl_module, callback._names_for(pl_module, names))
                elif names is not None:
                    callback.detach(pl_module)
                    callback._warn_no_ema(checkpoint_path)
                return orig(checkpoint_path, *args, **kwargs)
            checkpoint = orig(checkpoint_path, *args, **kwargs)
            sd = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
            if isinstance(sd, dict):
                names = [k[len(EMA_PREFIX) :] for k in sd if k.startswith(EMA_PREFIX)]
                if names:
                    keep = callback._names_for(pl_module, names)
                    for n in set(names) - set(keep):
                        sd.pop(EMA_PREFIX + n)
                    callback.attach(pl_module, keep)
                else:
                    callback.detach(pl_module)
                    callback._warn_no_ema(checkpoint_path)
            return checkpoint

        self._orig_load_checkpoint = orig
        self._strategy = strategy
        strategy.load_checkpoint = load_checkpoint

    def _unwrap_load_checkpoint(self) -> None:
        if self._orig_load_checkpoint is not None and self._strategy is not None:
            try:
                del self._strategy.load_checkpoint  # drop the instance attribute -> class method again
            except AttributeError:  # pragma: no cover
                pass
        self._orig_load_checkpoint = None
        self._strategy = None

    @staticmethod
    def _warn_no_ema(path: Any) -> None:
        warnings.warn(
            f"EMA: checkpoint {path} has no EMA weights; the EMA starts from the restored weights.", stacklevel=3
        )

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._wrap_load_checkpoint(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the strategy wrapped/sharded the model; a restore (if any) attaches in load_checkpoint
        if trainer.ckpt_path is None:
            self.attach(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after any restore: a checkpoint without EMA leaves no buffers -> start from the restored weights
        self.attach(pl_module)
        self._last_bucket = self._bucket(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        g = trainer.global_step
        if g == 0:
            return
        self.step(pl_module, g)

    def _swap_in(self, pl_module: LightningModule) -> None:
        shadow = _shadow(pl_module)
        if self.use_ema_for_eval and shadow is not None and not shadow.swapped:
            shadow.swap_in(pl_module)
            self._swapped_here = True

    def _swap_out(self, pl_module: LightningModule) -> None:
        shadow = _shadow(pl_module)
        if self._swapped_here and shadow is not None:
            shadow.swap_out(pl_module)
        self._swapped_here = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._swap_out(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._swap_out(pl_module)
        self._unwrap_load_checkpoint()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        shadow = _shadow(pl_module)
        if shadow is not None and shadow.swapped:
            warnings.warn(
                "EMA: a checkpoint was saved while the EMA weights were swapped in; its raw weights are the EMA ones."
                " Save outside `ema_weights(...)` / after validation ends.",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        # scalars only: the EMA tensors are module state (sharded with the model)
        return {
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "every_n_steps": self.every_n_steps,
            "start_step": self.start_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = {k: v for k, v in state_dict.items() if getattr(self, k, v) != v}
        if changed:
            warnings.warn(f"EMA settings differ from the checkpoint's {changed}; using the current ones.", stacklevel=2)
