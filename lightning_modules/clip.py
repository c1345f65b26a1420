"""CLIP (Radford et al. 2021) trained with open_clip's own model and contrastive loss, as a LightningModule.

Make-A-Video builds on a frozen CLIP (C_x for text, C_y for images; spec make_a_video_videopoet.md §1.1). No CLIP
weights are downloadable here, so the demo trains a tiny one on the demo's frames and captions
(``configs/make_a_video/clip_tiny.yaml``). The network is ``open_clip.CLIP`` and the loss ``open_clip.ClipLoss``
(symmetric InfoNCE over the batch with a learned temperature, clamped at 100 as open_clip's training does). The
resolved open_clip config is saved as ``hyper_parameters.model_cfg``, so ``OpenCLIPEncoder`` (text_encoders.py,
``image_tower: true``) rebuilds the towers from the checkpoint alone.

Validation reports zero-shot caption->frame retrieval: for every validation caption, the frame with the highest
cosine similarity among all validation frames; a hit when that frame's caption is the query caption (captions
repeat, so exact-index retrieval would be ill-posed). ``val/retrieval_chance`` is the hit rate of a random frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from vidgen.lightning_modules.nn.optim import cpu_multi_tensor
from vidgen.lightning_modules.nn.batches import eval_rows
from vidgen.lightning_modules.nn.step_logs import log_step
from vidgen.lightning_modules.nn.text_encoders import clip_preprocess

__all__ = ["CLIP", "pick_frames", "retrieval_accuracy", "gather_pairs", "CLIP_SIZES"]


def pick_frames(video: Tensor, which: str, generator: torch.Generator | None = None) -> Tensor:
    """One frame per clip ``[B, C, T, H, W] -> [B, C, H, W]``: 'first' | 'middle' | 'last' | 'random'."""
    if video.ndim == 4:
        return video
    t = video.shape[2]
    if which == "first":
        idx = torch.zeros(video.shape[0], dtype=torch.long)
    elif which == "middle":
        idx = torch.full((video.shape[0],), t // 2, dtype=torch.long)
    elif which == "last":
        idx = torch.full((video.shape[0],), t - 1, dtype=torch.long)
    elif which == "random":
        idx = torch.randint(0, t, (video.shape[0],), generator=generator)
    else:
        raise ValueError(f"frame choice must be first|middle|last|random, got {which!r}")
    return video[torch.arange(video.shape[0]), :, idx.to(video.device)]


def retrieval_accuracy(text_features: Tensor, image_features: Tensor, captions: list[str]) -> tuple[float, float]:
    """(caption->frame top-1 hit rate, chance rate); a hit is a retrieved frame whose caption equals the query's."""
    sim = text_features.float() @ image_features.float().T
    best = sim.argmax(dim=1).tolist()
    hits = sum(captions[j] == captions[i] for i, j in enumerate(best))
    n = len(captions)
    chance = sum(sum(c == d for d in captions) / n for c in captions) / n
    return hits / n, chance


def gather_pairs(image_features: Tensor, text_features: Tensor, captions: list[str]) -> tuple[Tensor, Tensor, list[str]]:
    """Every rank's validation pairs, in rank order (retrieval ranks one caption against the whole split's frames, so
    under DDP it needs them all; a single process gets its own back)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features, captions
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (image_features.cpu(), text_features.cpu(), list(captions)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), [c for p in parts for c in p[2]]


class CLIP(L.LightningModule):
    """open_clip ``CLIP`` + ``ClipLoss`` on (frame, caption) pairs (Radford et al. 2021, §2.3 contrastive objective).

    Args:
        model_cfg: an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``), e.g. a tiny one; or
        model_name: a named open_clip config (``ViT-B-32``) when ``model_cfg`` is not given (random init).
        image_frame: which frame of a clip pairs with its caption ('random' in training; eval uses 'middle').
        lr, weight_decay, warmup_steps: AdamW with linear warmup then cosine decay to 0 over ``max_steps``.
    """

    def __init__(
        self,
        model_cfg: dict | None = None,
        model_name: str | None = None,
        image_frame: Literal["random", "first", "middle", "last"] = "random",
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        import open_clip

        if model_cfg is None:
            if model_name is None:
                raise ValueError("CLIP needs model_cfg (an open_clip config dict) or model_name (e.g. ViT-B-32)")
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(f"unknown open_clip model_name {model_name!r}; see open_clip.list_models()")
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in model_cfg:
                raise ValueError(f"CLIP model_cfg lacks {key!r}; give embed_dim, vision_cfg and text_cfg")
        if image_frame not in ("random", "first", "middle", "last"):
            raise ValueError(f"CLIP image_frame must be random|first|middle|last, got {image_frame!r}")
        self.hparams["model_cfg"] = dict(model_cfg)  # read back by OpenCLIPEncoder
        cfg = dict(model_cfg)
        self.model = open_clip.CLIP(cfg["embed_dim"], open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]),
                                    open_clip.model.CLIPTextCfg(**cfg["text_cfg"]),
                                    quick_gelu=bool(cfg.get("quick_gelu", False)))
        self.loss = open_clip.ClipLoss()
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.model.context_length)
        size = cfg["vision_cfg"].get("image_size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(cfg.get("preprocess_cfg", {}).get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("preprocess_cfg", {}).get("std", open_clip.OPENAI_DATASET_STD))
        self._val: list[tuple[Tensor, Tensor, list[str]]] = []

    # -- features ----------------------------------------------------------------------------------------------------
    def features(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(normalised image features, normalised text features, logit scale) for images in [-1, 1]."""
        x = clip_preprocess(images, self.image_size, self.mean, self.std)
        ids = self.tokenizer(list(texts)).to(self.device)
        img, txt, scale = self.model(x, ids)
        return img, txt, scale

    def _pairs(self, batch: Mapping[str, Any], frame: str) -> tuple[Tensor, list[str]]:
        texts = list(batch.get("text") or [])
        video = batch["video"]
        if len(texts) != video.shape[0] or any(not t for t in texts):
            raise ValueError("CLIP trains on captioned frames: every sample needs batch['text'] (set data.require_text)")
        return pick_frames(video, frame), texts

    # -- training ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, texts = self._pairs(batch, self.hparams.image_frame)
        img, txt, scale = self.features(images, texts)
        loss = self.loss(img, txt, scale)
        log_step(self, {"train/loss": loss, "train/logit_scale": scale}, len(texts))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # open_clip training clamps the temperature at 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch, n = eval_rows(batch)  # DDP padding dropped (all padding: one row, weight 0, nothing kept)
        images, texts = self._pairs(batch, "middle")
        img, txt, scale = self.features(images, texts)
        loss = self.loss(img, txt, scale)
        self._val.append((img[:n].detach().cpu(), txt[:n].detach().cpu(), texts[:n]))
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        img = torch.cat([v[0] for v in self._val])
        txt = torch.cat([v[1] for v in self._val])
        caps = [c for v in self._val for c in v[2]]
        self._val = []
        img, txt, caps = gather_pairs(img, txt, caps)  # the whole split on every rank (the same value everywhere)
        acc, chance = retrieval_accuracy(txt, img, caps)
        self.log("val/retrieval_acc", acc, prog_bar=True)
        self.log("val/retrieval_chance", chance)

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = cpu_multi_tensor(torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                                  {"params": rest, "weight_decay": 0.0}],
                                                 lr=hp.lr, betas=tuple(hp.betas), eps=1e-6))
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        if not total:
            return opt
        warm = hp.warmup_steps

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                    "interval": "step"}}


# ----------------------------------------------------------------------------------------------------------------------
# Sizes: the demo's tiny CLIP; full-size runs use open_clip's named configs (model_name: ViT-B-32, ViT-H-14, ...)
# ----------------------------------------------------------------------------------------------------------------------
CLIP_SIZES: dict[str, dict] = {
    "tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}
