"""``StagedCurriculum``: a training run in stages that change the data mixture, the clip shape, which parameters
train and an LR multiplier, mid-run and without restarting the process.

Examples from the papers:

* VideoPoet (spec make_a_video_videopoet.md, "two-stage mixture"): images 90% / videos 10% for the first 25% of the
  iterations, then 10% / 90%::

      stages: [{weights: {images: 0.9, videos: 0.1}}, {at_fraction: 0.25, weights: {images: 0.1, videos: 0.9}}]

* Make-A-Video / Tora: spatial layers frozen, temporal layers trained (``trainable: ["temporal"]``).
* MAGVIT-v2 (spec magvit.md §5.2): images first, then video (``weights`` + ``num_frames``).

A stage is a mapping with

* a boundary: ``at_step`` (int) or ``at_fraction`` (of ``total_steps``, default ``trainer.max_steps``); the first
  stage may omit it (it starts at step 0; if the first boundary is later, an implicit stage 0 with the settings the
  run was configured with comes first);
* what changes (every field not given is inherited from the previous stage):
  ``weights`` (mixture weights, a list in ``data.sources`` order or a mapping ``{source name: weight}``),
  ``num_frames``, ``resolution`` (int or [h, w]), ``fps_range`` ([lo, hi] of the per-clip fps draw; Make-A-Video
  §3.4 starts at high fps (little motion) and moves to low fps) -- passed to ``VideoDataModule.set_stages``;
  ``trainable`` / ``frozen`` (regex patterns, ``re.search`` over ``named_parameters()`` names): with ``trainable``
  only the matching parameters train (minus those matching ``frozen``); with only ``frozen`` everything but the
  matching ones trains; ``frozen: []`` unfreezes everything again;
  ``lr_scale`` (multiplier on every optimizer's learning rate, on top of the scheduler);
  ``model`` (a mapping of model settings handed to ``pl_module.set_curriculum_settings(mapping)`` at the stage's
  first batch, e.g. Tora's ``{motion_mode: sparse}`` for its dense -> sparse trajectory stages; settings merge
  over the previous stages', and the module must define that method);
* optionally a ``name`` for the console line.

The clock ("step") is ``trainer.global_step`` (optimizer steps) for automatic optimization. Models with manual
optimization that step several optimizers per batch (the GAN tokenizers: G and D) count batches instead, like their
own schedules: there the clock is the number of batches consumed, and ``at_fraction`` should come with
``total_steps`` given in batches.

How each part is made exact:

* data: the whole schedule is installed once at fit start with ``VideoDataModule.set_stages``, boundaries converted
  to rank-local batch indices (``at_step * accumulate_grad_batches``). Loader workers read the table per batch, so the
  stream is a pure function of (seed, table) -- deterministic, exactly resumable, and independent of Lightning's
  prefetching. The datamodule stores the table in its checkpoint state as well.
* parameters: ``requires_grad`` is set in ``on_train_batch_start`` of the first batch of a stage (before its
  forward). Only parameters that were trainable at fit start are touched: what the model froze itself (frozen text
  encoders, perceptual nets) stays frozen. Optimizers keep the frozen parameters; they get no gradient, their
  ``.grad`` is cleared before every optimizer step, and Adam/AdamW skip parameters without a gradient (no momentum
  drift, no weight decay). Under FSDP2 the sharded DTensor parameters are toggled (after resharding any module
  left gathered by a no-grad forward); FSDP2 copies the flag to the unsharded parameter at each all-gather. Under
  DDP a mid-run change of ``requires_grad`` needs ``find_unused_parameters: true`` (the reducer otherwise waits for
  gradients that never come); this is checked at setup.
* LR: optimizer step pre/post hooks multiply each param group's ``lr`` by the stage's ``lr_scale`` for the duration
  of ``optimizer.step()`` only, so schedulers never see a scaled value: nothing compounds, and checkpoints hold the
  unscaled LR. The scale is a function of the stage, itself a function of the step, so resume restores it.
* resume: the stage is recomputed from the restored step; the callback state (stage index, written by rank 0 only
  under FSDP2, identical on all ranks) is only compared with it to warn when the schedule changed.

Logged: ``curriculum/stage`` and ``curriculum/lr_scale`` every step, and a console line at each transition.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from vidgen.lightning_modules.nn.sharding import reshard_all

__all__ = ["StagedCurriculum", "CurriculumConfigError"]

STAGE_KEYS = ("name", "at_step", "at_fraction", "weights", "num_frames", "resolution", "fps_range", "trainable",
              "frozen", "lr_scale", "model")
DATA_KEYS = ("weights", "num_frames", "resolution", "fps_range")


class CurriculumConfigError(ValueError):
    """A curriculum stage that cannot work; the message names the stage, the key and the fix."""


def _patterns(value, where: str) -> list[re.Pattern] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CurriculumConfigError(f"{where} must be a regex string or a list of them, got {value!r}")
    out = []
    for v in value:
        try:
            out.append(re.compile(v))
        except re.error as e:
            raise CurriculumConfigError(f"{where}: {v!r} is not a valid regular expression ({e})") from None
    return out


class StagedCurriculum(Callback):
    """Staged training schedule (data mixture / clip shape / trainable groups / LR multiplier); see module docstring.

    Args:
        stages: list of stage mappings (keys: ``name, at_step | at_fraction, weights, num_frames, resolution,
            trainable, frozen, lr_scale``).
        total_steps: what ``at_fraction`` is a fraction of (default: ``trainer.max_steps``).
    """

    def __init__(self, stages: list[dict], total_steps: int | None = None):
        super().__init__()
        if not isinstance(stages, (list, tuple)) or not stages:
            raise CurriculumConfigError("StagedCurriculum needs a non-empty list of stages")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise CurriculumConfigError(f"total_steps must be a positive integer or null, got {total_steps!r}")
        self.total_steps = total_steps
        self.stages = [self._check_stage(i, s) for i, s in enumerate(stages)]
        if self.stages[0].get("at_step") is None and self.stages[0].get("at_fraction") is None:
            self.stages[0]["at_step"] = 0
        for i, s in enumerate(self.stages[1:], 1):
            if s.get("at_step") is None and s.get("at_fraction") is None:
                raise CurriculumConfigError(f"curriculum stage {i} needs a boundary: at_step (int) or at_fraction")
        if not (self.stages[0].get("at_step") == 0 or self.stages[0].get("at_fraction") == 0):
            # an implicit first stage: the run's own configuration
            self.stages.insert(0, {"name": "initial", "at_step": 0})
        self._check_monotonic([s.get("at_step") for s in self.stages], "at_step")
        self._check_monotonic([s.get("at_fraction") for s in self.stages], "at_fraction")
        self._resolved: list[dict] | None = None  # stages with inherited fields and at_step filled in (setup)
        self._base: set[str] | None = None        # parameters trainable at fit start
        self._stage: int | None = None             # stage in force (None: not applied yet)
        self._loaded_stage: int | None = None
        self._hooks: list = []
        self._manual = False

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_stage(i: int, s: Any) -> dict:
        where = f"curriculum stage {i}"
        if not isinstance(s, dict):
            raise CurriculumConfigError(f"{where} must be a mapping, got {s!r}")
        unknown = sorted(set(s) - set(STAGE_KEYS))
        if unknown:
            raise CurriculumConfigError(f"{where} has unknown keys {unknown}; allowed: {list(STAGE_KEYS)}")
        s = dict(s)
        if s.get("at_step") is not None and s.get("at_fraction") is not None:
            raise CurriculumConfigError(f"{where}: give at_step or at_fraction, not both")
        if s.get("at_step") is not None and (not isinstance(s["at_step"], int) or isinstance(s["at_step"], bool)
                                             or s["at_step"] < 0):
            raise CurriculumConfigError(f"{where}: at_step must be an integer >= 0, got {s['at_step']!r}")
        if s.get("at_fraction") is not None:
            f = s["at_fraction"]
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f <= 1:
                raise CurriculumConfigError(f"{where}: at_fraction must be a number in [0, 1], got {f!r}")
        if s.get("num_frames") is not None and (not isinstance(s["num_frames"], int) or s["num_frames"] < 1):
            raise CurriculumConfigError(f"{where}: num_frames must be a positive integer, got {s['num_frames']!r}")
        r = s.get("resolution")
        if r is not None and not ((isinstance(r, int) and r > 0) or (isinstance(r, (list, tuple)) and len(r) == 2
                                                                     and all(isinstance(x, int) and x > 0 for x in r))):
            raise CurriculumConfigError(f"{where}: resolution must be a positive int or [height, width], got {r!r}")
        w = s.get("weights")
        if w is not None:
            vals = list(w.values()) if isinstance(w, dict) else w
            if not isinstance(vals, (list, tuple)) or not vals or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in vals) or sum(vals) <= 0:
                raise CurriculumConfigError(f"{where}: weights must be non-negative numbers with a positive sum (a list "
                                            f"in data.sources order or a mapping source name -> weight), got {w!r}")
        if s.get("lr_scale") is not None:
            v = s["lr_scale"]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise CurriculumConfigError(f"{where}: lr_scale must be a positive number, got {v!r}")
        if s.get("model") is not None and not (isinstance(s["model"], dict) and all(isinstance(k, str) for k in s["model"])):
            raise CurriculumConfigError(f"{where}: model must be a mapping of model setting -> value, got {s['model']!r}")
        fr = s.get("fps_range")
        if fr is not None and not (isinstance(fr, (list, tuple)) and len(fr) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in fr) and 0 < fr[0] <= fr[1]):
            raise CurriculumConfigError(f"{where}: fps_range must be [lo, hi] with 0 < lo <= hi, got {fr!r}")
        _patterns(s.get("trainable"), f"{where}.trainable")
        _patterns(s.get("frozen"), f"{where}.frozen")
        return s

    @staticmethod
    def _check_monotonic(values: list, key: str):
        seen = [(i, v) for i, v in enumerate(values) if v is not None]
        for (i, a), (j, b) in zip(seen, seen[1:]):
            if b <= a:
                raise CurriculumConfigError(f"curriculum boundaries must increase: stage {j} {key}={b} is not after "
                                            f"stage {i} {key}={a}")

    # ------------------------------------------------------------------ setup
    def _total(self, trainer) -> int:
        total = self.total_steps or trainer.max_steps
        if total is None or total < 1:
            raise CurriculumConfigError("curriculum at_fraction needs trainer.max_steps (or StagedCurriculum "
                                        "total_steps) to be set to a positive number")
        return int(total)

    def _batches_per_step(self, trainer) -> int:
        return 1 if self._manual else int(trainer.accumulate_grad_batches)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._manual = not pl_module.automatic_optimization
        # boundaries in steps
        steps = []
        for i, s in enumerate(self.stages):
            steps.append(s["at_step"] if s.get("at_step") is not None
                         else int(math.floor(s["at_fraction"] * self._total(trainer) + 1e-9)))
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                raise CurriculumConfigError(f"curriculum boundaries must increase: stage {i} starts at step {steps[i]}, "
                                            f"stage {i - 1} at step {steps[i - 1]} (at_fraction of {self._total(trainer)})")
        # data
        dm = trainer.datamodule
        uses_data = any(s.get(k) is not None for s in self.stages for k in DATA_KEYS)
        names = self._source_names(dm)
        if uses_data and (dm is None or not hasattr(dm, "set_stages")):
            raise CurriculumConfigError("curriculum stages set weights/num_frames/resolution, which needs a datamodule "
                                        "with set_stages() (vidgen.datamodules.video.VideoDataModule); got "
                                        f"{type(dm).__name__ if dm is not None else 'no datamodule'}")
        # parameters
        names_p = [n for n, _ in pl_module.named_parameters()]
        for i, s in enumerate(self.stages):
            for key in ("trainable", "frozen"):
                for pat in _patterns(s.get(key), f"curriculum stage {i}.{key}") or []:
                    if not any(pat.search(n) for n in names_p):
                        raise CurriculumConfigError(
                            f"curriculum stage {i}.{key}: pattern {pat.pattern!r} matches no parameter of "
                            f"{type(pl_module).__name__} (names look like {names_p[:4]})")
        if any(s.get("model") for s in self.stages) and not callable(getattr(pl_module, "set_curriculum_settings", None)):
            raise CurriculumConfigError(f"curriculum stages set model settings, but {type(pl_module).__name__} has no "
                                        "set_curriculum_settings(mapping) method; remove the stages' model key")
        changes_grad = any(s.get("trainable") is not None or s.get("frozen") is not None for s in self.stages)
        if changes_grad:
            self._check_strategy(trainer)
        # resolve inheritance
        resolved, prev = [], {"weights": None, "num_frames": None, "resolution": None, "fps_range": None,
                              "trainable": None, "frozen": None, "lr_scale": 1.0, "model": {}}
        for i, (s, st) in enumerate(zip(self.stages, steps)):
            r = dict(prev)
            for k in ("weights", "num_frames", "resolution", "fps_range", "lr_scale"):
                if s.get(k) is not None:
                    r[k] = s[k]
            if s.get("trainable") is not None or s.get("frozen") is not None:
                r["trainable"], r["frozen"] = s.get("trainable"), s.get("frozen")
            if s.get("weights") is not None:
                r["weights"] = self._weights_list(i, s["weights"], names)
            r["model"] = {**prev["model"], **(s.get("model") or {})}
            r["at_step"], r["name"] = st, s.get("name") or f"stage{i}"
            resolved.append(r)
            prev = {k: r[k] for k in prev}
        self._resolved = resolved

    @staticmethod
    def _source_names(dm) -> list[str] | None:
        specs = getattr(dm, "_source_specs", None)
        if specs is None:
            return None
        return [s.get("name", f"source{i}") for i, s in enumerate(specs)]

    @staticmethod
    def _weights_list(i: int, w, names: list[str] | None) -> list[float]:
        if names is None:
            if isinstance(w, dict):
                raise CurriculumConfigError(f"curriculum stage {i}: weights by name need a datamodule with named sources")
            return [float(x) for x in w]
        if isinstance(w, dict):
            unknown = sorted(set(w) - set(names))
            if unknown:
                raise CurriculumConfigError(f"curriculum stage {i}: weights name unknown sources {unknown}; the data "
                                            f"sources are {names}")
            return [float(w.get(n, 0.0)) for n in names]
        if len(w) != len(names):
            raise CurriculumConfigError(f"curriculum stage {i}: {len(w)} weights {list(w)} for {len(names)} data "
                                        f"sources {names}; give one weight per source (or a mapping name -> weight)")
        return [float(x) for x in w]

    @staticmethod
    def _check_strategy(trainer):
        from lightning.pytorch.strategies import DDPStrategy

        strat = trainer.strategy
        if isinstance(strat, DDPStrategy):
            kw = getattr(strat, "_ddp_kwargs", {}) or {}
            if not kw.get("find_unused_parameters", False) or kw.get("static_graph", False):
                raise CurriculumConfigError(
                    "the curriculum changes which parameters train mid-run; under DDP that needs "
                    "find_unused_parameters: true and static_graph: false (set trainer.strategy.init_args."
                    "find_unused_parameters: true), else the gradient reducer waits for gradients that never come")

    # ------------------------------------------------------------------ schedule
    def stage_at(self, step: int) -> int:
        """Index of the stage in force at clock value ``step``."""
        if self._resolved is None:
            raise RuntimeError("StagedCurriculum.stage_at() is available after setup('fit')")
        idx = 0
        for i, s in enumerate(self._resolved):
            if s["at_step"] <= step:
                idx = i
        return idx

    def data_stages(self, trainer) -> list[dict]:
        """The ``VideoDataModule.set_stages`` schedule: boundaries in rank-local batches."""
        bps = self._batches_per_step(trainer)
        return [{"start_batch": s["at_step"] * bps, "weights": s["weights"], "num_frames": s["num_frames"],
                 "resolution": s["resolution"], "fps_range": s["fps_range"]} for s in self._resolved]

    def _clock(self, trainer) -> int:
        """Step of the batch about to run (called from on_train_batch_start)."""
        if not self._manual:
            return int(trainer.global_step)
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "batches_consumed"):
            return max(0, int(dm.batches_consumed) - 1)
        return max(0, int(trainer.fit_loop.epoch_loop.total_batch_idx))

    @property
    def current_stage(self) -> int | None:
        return self._stage

    @property
    def lr_scale(self) -> float:
        return 1.0 if self._stage is None else float(self._resolved[self._stage]["lr_scale"])

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        self._base = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "set_stages") and any(
                s.get(k) is not None for s in self.stages for k in DATA_KEYS):
            new = self.data_stages(trainer)
            old = getattr(dm, "_stage_rows", None)  # set by a restored datamodule state
            dm.set_stages(new)
            if old is not None and getattr(dm, "_stage_rows", None) != old and trainer.ckpt_path:
                warnings.warn("the curriculum's data schedule differs from the one in the checkpoint; using the "
                              "current one (the resumed stream is then not that of an uninterrupted run)")

    def on_train_start(self, trainer, pl_module) -> None:
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))
            self._hooks.append(opt.register_step_post_hook(self._post_step))
        self._stage = None  # (re)applied on the first batch from the restored step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = self._clock(trainer)
        idx = self.stage_at(step)
        if idx != self._stage:
            first = self._stage is None
            if first and self._loaded_stage is not None and self._loaded_stage != idx:
                warnings.warn(f"curriculum: the checkpoint was in stage {self._loaded_stage}, the schedule puts step "
                              f"{step} in stage {idx} (the schedule changed?); using stage {idx}")
            self._stage = idx
            n_train, n_all = self._apply_trainable(pl_module, self._resolved[idx])
            s = self._resolved[idx]
            what = [f"lr_scale={s['lr_scale']:g}", f"trainable {n_train}/{n_all} tensors"]
            for k in DATA_KEYS:
                if s[k] is not None:
                    what.append(f"{k}={s[k]}")
            if s["model"]:
                pl_module.set_curriculum_settings(dict(s["model"]))
                what.append(f"model {s['model']}")
            rank_zero_info(f"curriculum: step {step}: {'resuming in' if first and step else 'entering'} stage "
                           f"{idx} ({s['name']}): " + ", ".join(what))
        pl_module.log("curriculum/stage", float(self._stage), on_step=True, on_epoch=False)
        pl_module.log("curriculum/lr_scale", self.lr_scale, on_step=True, on_epoch=False)

    def _wants_grad(self, name: str, s: dict) -> bool:
        tr, fr = _patterns(s["trainable"], "trainable"), _patterns(s["frozen"], "frozen")
        want = True if tr is None else any(p.search(name) for p in tr)
        if fr is not None and any(p.search(name) for p in fr):
            want = False
        return want

    @torch.no_grad()
    def _apply_trainable(self, pl_module, s: dict) -> tuple[int, int]:
        reshard_all(pl_module)
        n_train = 0
        for name, p in pl_module.named_parameters():
            if name not in self._base:
                continue
            want = self._wants_grad(name, s)
            if p.requires_grad != want:
                p.requires_grad_(want)
                if not want:
                    p.grad = None
            n_train += want
        self._frozen_any = n_train < len(self._base)
        return n_train, len(self._base)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._stage is None or self._base is None or not getattr(self, "_frozen_any", False):
            return  # nothing frozen in this stage: no per-step walk over the parameters
        for name, p in pl_module.named_parameters():
            if name in self._base and not p.requires_grad:
                p.grad = None  # Adam(W) skips parameters without a gradient

    # LR multiplier, applied only inside optimizer.step()
    def _pre_step(self, optimizer, args, kwargs):
        scale = self.lr_scale
        if scale == 1.0 or getattr(optimizer, "_curriculum_saved_lr", None) is not None:
            return  # already scaled for this step: a step wrapped twice (torch patches step per class) runs hooks twice
        optimizer._curriculum_saved_lr = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * scale

    def _post_step(self, optimizer, args, kwargs):
        saved = getattr(optimizer, "_curriculum_saved_lr", None)
        if saved is None:
            return
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr
        del optimizer._curriculum_saved_lr

    def _remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_hooks()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"stage": self._stage, "boundaries": None if self._resolved is None
                else [s["at_step"] for s in self._resolved]}

    def load_state_dict(self, state: dict) -> None:
        self._loaded_stage = state.get("stage")
