"""The Make-A-Video cascade, Eq. 1: ``ŷ_t = SR_h ∘ SR_l^t ∘ ↑F ∘ D^t ∘ P ∘ (x̂, C_x(x))`` (Singer et al. 2022;
spec make_a_video_videopoet.md §1.1, §1.6, §1.7).

``MakeAVideoCascade`` is one pipeline object over separately trained stages (each from its own checkpoint, §1.5
"each component is trained independently"), diffusers-like: per-stage sampling steps and guidance, one
``torch.Generator`` seeding every stage in order, stage outputs kept for inspection, SR_h in frame batches. A stage
left out (``interpolation: null``, ``sr_high: null``) ends the cascade earlier, e.g. at 16 x 256^2 for the MSR-VTT
protocol or 76 x 256^2 for the paper's human evaluation. ``vidgen predict --prompts ...`` and the evaluation
protocols (README "Make-A-Video evaluation") run it.

Stage by stage (paper sizes): text -> C_x -> P -> y_e; D^t(y_e, fps) -> 16 x 64^2; ↑F(skip 5, fps x 5) -> 76 x 64^2;
SR_l^t -> 76 x 256^2; SR_h (per frame, one noise per clip) -> 76 x 768^2.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vidgen.lightning_modules.make_a_video import MakeAVideoConfigError, MakeAVideoDecoder, _defaults, _frozen, load_stage
from vidgen.lightning_modules.make_a_video_interp import MaskedFrameInterpolation
from vidgen.lightning_modules.make_a_video_sr import MakeAVideoSR

__all__ = ["MakeAVideoCascade", "CASCADE_STAGES", "ucf101_prompts"]

CASCADE_STAGES = ("prior", "decoder", "interpolation", "sr_low", "sr_high")
GUIDED_STAGES = ("prior", "decoder", "interpolation")  # the SR stages have no null condition (no CFG)


class MakeAVideoCascade(L.LightningModule):
    """Eq. 1 as one sampler over trained stages (inference only; each stage trains with its own recipe).

    Args:
        decoder: D^t checkpoint (``MakeAVideoDecoder`` stage 'video'); its CLIP and prior come with it.
        prior: the prior P checkpoint (default: the one D^t's checkpoint names). clip: override of the CLIP config.
        interpolation: ↑F checkpoint (``MaskedFrameInterpolation``) or null (no frame interpolation).
        sr_low: SR_l^t checkpoint (``MakeAVideoSR`` spatiotemporal) or null. sr_high: SR_h checkpoint or null.
        steps: sampling steps per stage (``prior``, ``decoder``, ``interpolation``, ``sr_low``, ``sr_high``);
            unset stages use their checkpoint's ``sample_steps``.
        guidance: CFG scale per guided stage (``prior``, ``decoder``, ``interpolation``); unset: the checkpoint's.
        sample_fps: the fps D^t is asked for; ↑F then runs at ``sample_fps x frame_skip``.
        interpolation_fps: the output fps ↑F is conditioned on instead (null: ``sample_fps x frame_skip``); set it
            to the fps ↑F was trained at when that differs (a model conditioned on an fps it never saw gets an
            untrained embedding) [not in the paper].
        frame_skip: ↑F's skip (5: 16 -> 76 frames).
        aug_levels: noise-augmentation level per SR stage at sampling (``sr_low``, ``sr_high``; fraction of the
            schedule); unset: the checkpoint's ``sample_aug_level``.
        frame_batch: SR_h frames per U-Net call (0: all); chunk_frames / chunk_overlap: SR_l^t temporal windows
            (null: the checkpoint's setting).
        keep_stages: ``predict_step`` also returns every stage's output (``stage_<name>`` in samples.npz).
    """

    def __init__(
        self,
        decoder: str,
        prior: str | None = None,
        clip: dict | None = None,
        interpolation: str | None = None,
        sr_low: str | None = None,
        sr_high: str | None = None,
        steps: dict[str, int] | None = None,
        guidance: dict[str, float] | None = None,
        sample_fps: float = 4.0,
        frame_skip: int = 5,
        interpolation_fps: float | None = None,
        aug_levels: dict[str, float] | None = None,
        frame_batch: int = 0,
        chunk_frames: int | None = None,
        chunk_overlap: int | None = None,
        keep_stages: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.validate_config(dict(self.hparams))
        over: dict[str, Any] = {}
        if prior:
            over["prior"] = prior
        if clip:
            over["clip"] = clip
        self.decoder = load_stage(MakeAVideoDecoder, decoder, **over)
        if self.decoder.hparams.stage != "video":
            raise MakeAVideoConfigError(f"decoder {decoder!r} is an image-stage D; the cascade needs D^t (stage: video)")
        if self.decoder.prior is None:
            raise MakeAVideoConfigError(f"decoder {decoder!r} names no prior checkpoint: set model.prior (text -> y_e)")
        self.interpolation = (load_stage(MaskedFrameInterpolation, interpolation, **({"clip": clip} if clip else {}))
                              if interpolation else None)
        if self.interpolation is not None:
            _frozen(self.interpolation, "clip", self.decoder.clip)
        sr_over = {k: v for k, v in (("chunk_frames", chunk_frames), ("chunk_overlap", chunk_overlap)) if v is not None}
        self.sr_low = load_stage(MakeAVideoSR, sr_low, **sr_over) if sr_low else None
        self.sr_high = load_stage(MakeAVideoSR, sr_high, frame_batch=frame_batch) if sr_high else None
        for name, m, stage in (("sr_low", self.sr_low, "spatiotemporal"), ("sr_high", self.sr_high, "spatial")):
            if m is not None and m.hparams.stage != stage:
                raise MakeAVideoConfigError(f"{name} must be a {stage} MakeAVideoSR checkpoint, got stage "
                                            f"{m.hparams.stage!r}")

    @classmethod
    def validate_config(cls, args: Mapping[str, Any]) -> None:
        a = {**_defaults(cls), **dict(args)}
        for key in ("decoder", "prior", "interpolation", "sr_low", "sr_high"):
            if a.get(key) and not os.path.isfile(a[key]):
                raise MakeAVideoConfigError(f"cascade {key} {a[key]!r} does not exist (a local checkpoint path)")
        if not a.get("decoder"):
            raise MakeAVideoConfigError("cascade decoder is required: the D^t checkpoint (MakeAVideoDecoder, stage video)")
        bad = sorted(set(a["steps"] or {}) - set(CASCADE_STAGES))
        if bad:
            raise MakeAVideoConfigError(f"cascade steps has unknown stages {bad}; stages are {list(CASCADE_STAGES)}")
        bad = sorted(set(a["guidance"] or {}) - set(GUIDED_STAGES))
        if bad:
            raise MakeAVideoConfigError(f"cascade guidance for {bad}: only {list(GUIDED_STAGES)} are guided (the SR "
                                        "stages have no null condition)")
        bad = sorted(set(a["aug_levels"] or {}) - {"sr_low", "sr_high"})
        if bad or any(not 0 <= v <= 1 for v in (a["aug_levels"] or {}).values()):
            raise MakeAVideoConfigError(f"cascade aug_levels: keys sr_low / sr_high with levels in [0, 1], got "
                                        f"{a['aug_levels']}")
        if a["interpolation_fps"] is not None and not a["interpolation_fps"] > 0:
            raise MakeAVideoConfigError(f"cascade interpolation_fps must be > 0 or null, got {a['interpolation_fps']}")
        if a["frame_skip"] < 1 or a["frame_batch"] < 0 or not a["sample_fps"] > 0:
            raise MakeAVideoConfigError("cascade frame_skip >= 1, frame_batch >= 0 and sample_fps > 0 are required")

    # -- sampling ----------------------------------------------------------------------------------------------------
    def _steps(self, stage: str, default: Any) -> Any:
        return (self.hparams.steps or {}).get(stage, default)

    def _cfg(self, stage: str, default: float) -> float:
        return float((self.hparams.guidance or {}).get(stage, default))

    @torch.no_grad()
    def run(self, texts: list[str] | None = None, image_embed: Tensor | None = None,
            generator: torch.Generator | None = None, keep_stages: bool | None = None) -> dict[str, Any]:
        """Eq. 1 for ``texts`` (or given y_e): ``{"video": the last stage's output [B, 3, T, H, W] in [-1, 1],
        "image_embed": y_e, "stages": {stage: output}}`` (``stages`` filled when ``keep_stages``)."""
        keep = self.hparams.keep_stages if keep_stages is None else keep_stages
        stages: dict[str, Tensor] = {}
        dec = self.decoder
        dhp = dec.hparams
        if image_embed is None:
            if not texts:
                raise ValueError("the cascade samples from captions (texts) or given CLIP image embeddings")
            dec.prior.to(self.device)
            y_e = dec.prior.sample(texts, generator=generator, cfg_scale=self._cfg("prior", dec.hparams.prior_cfg_scale),
                                   steps=self._steps("prior", None))
        else:
            y_e = image_embed.to(self.device).float()
        fps = torch.full((y_e.shape[0],), float(self.hparams.sample_fps), device=self.device)
        x = dec.sample_videos(y_e, fps, generator, steps=self._steps("decoder", None),
                              cfg_scale=self._cfg("decoder", dhp.cfg_scale))
        if keep:
            stages["decoder"] = x
        if self.interpolation is not None:
            up = self.interpolation
            skip, in_fps = int(self.hparams.frame_skip), self.hparams.interpolation_fps
            x = up.interpolate(x, skip, y_e=y_e, fps=fps if in_fps is None else torch.full_like(fps, in_fps / skip),
                               generator=generator,
                               steps=self._steps("interpolation", up.hparams.sample_steps),
                               cfg_scale=self._cfg("interpolation", up.hparams.cfg_scale))
            if keep:
                stages["interpolation"] = x
        for name in ("sr_low", "sr_high"):
            sr = getattr(self, name)
            if sr is not None:
                x = sr.upsample(x, generator, steps=self._steps(name, sr.hparams.sample_steps),
                                aug_level=(self.hparams.aug_levels or {}).get(name))
                if keep:
                    stages[name] = x
        return {"video": x, "image_embed": y_e, "stages": stages}

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """The cascade's final videos for ``batch['text']`` (or ``batch['image_embed']``)."""
        batch = batch or {}
        texts = list(batch.get("text") or [])[:num_samples] or None
        emb = batch.get("image_embed")
        return self.run(texts, None if emb is None else emb[:num_samples], generator)["video"]

    def prediction_inputs(self) -> dict:
        return {"kind": "text"}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        g = torch.Generator().manual_seed(batch_idx * 100003 + self.global_rank)
        texts = list(batch.get("text") or [])
        out = self.run(texts, batch.get("image_embed"), g)
        videos = out["video"]
        keys = list(batch.get("key") or [f"{batch_idx:05d}_{i:03d}" for i in range(len(videos))])
        pred = {"videos": videos, "keys": keys[: len(videos)]}
        if texts:
            pred["captions"] = texts[: len(videos)]
        for name, v in out["stages"].items():
            pred[f"stage_{name}"] = v
        return pred


def ucf101_prompts(classes: str | list[str], template: str = "a person {action}.") -> list[str]:
    """One prompt per UCF-101 class for the zero-shot protocol (§1.7: one template sentence per class, fixed before
    generation; the paper's hand-written sentences are unpublished [unverified]): ``ApplyEyeMakeup`` -> "a person
    apply eye makeup.". ``classes``: the class names or the ``classes.json`` that ``vidgen shards`` writes."""
    if isinstance(classes, str):
        with open(classes) as f:
            data = json.load(f)
        classes = list(data["classes"] if isinstance(data, dict) else data)
    words = [" ".join(w.lower() for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", c)) for c in classes]
    return [template.format(action=w) for w in words]
