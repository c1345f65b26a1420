"""VideoProbe: a small 3D-CNN video classifier that scores generated clips (not a paper model).

The Classification Accuracy Score idea (Ravuri & Vinyals, 2019): a classifier trained on *real* clips judges whether a
generator's samples show what was asked for. One head per attribute of the demo's procedural clips (one shape of one
colour moving in one direction): ``class`` (shape x direction, the demo's class label), ``shape``, ``colour`` and
``direction``. Targets come from the batch: ``label`` for ``class`` (and shape/direction, since class = shape x
direction) and the caption words for every attribute ("a red square moving left"); clips without an attribute (real
footage, stills) are ignored by that head.

Inputs of any length and size are brought to the probe's ``num_frames x resolution^2`` (frames picked evenly, area
resize), so one probe scores every generator of the demo. Training picks a random temporal stride per clip
(``temporal_strides``) so a generator's frame rate does not change the direction it reads.
"""

from __future__ import annotations

import dataclasses
import math
import re

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vidgen.lightning_modules.nn.conv3d import GroupNorm
from vidgen.lightning_modules.nn.optim import cpu_multi_tensor
from vidgen.lightning_modules.nn.batches import eval_rows
from vidgen.lightning_modules.nn.step_logs import log_step

DEMO_ATTRIBUTES = {  # the demo's procedural vocabulary (vidgen/demo_data.py), in label order
    "shape": ["square", "circle", "triangle"],
    "colour": ["red", "green", "blue", "yellow"],
    "direction": ["left", "right", "up", "down"],
}


@dataclasses.dataclass
class ProbeConfig:
    num_frames: int = 8
    resolution: int = 32
    channels: tuple[int, ...] = (16, 32, 64)  # one strided 3x3x3 conv stage each (space /2 per stage, time /2 after)
    norm_groups: int = 8
    dropout: float = 0.1
    attributes: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {k: list(v) for k, v in
                                                                                  DEMO_ATTRIBUTES.items()})
    class_of: tuple[str, ...] = ("shape", "direction")  # class = index(a) * len(b) + index(b); () -> class_count
    class_count: int | None = None  # classes read from labels only (e.g. UCF-101: 101) when class_of is empty
    temporal_strides: tuple[int, ...] = (1, 2)
    noise_std: float = 0.0  # Gaussian pixel noise augmentation (generated clips are noisier than real ones)
    motion_attribute: str = "direction"
    reverse_pairs: tuple = (("left", "right"), ("up", "down"))  # time reversal swaps these motion values
    mirror_pairs: tuple = (("left", "right"),)  # a horizontal mirror swaps these ([] disables mirroring)
    pool: str = "meanmax"  # global pooling: "mean" or "meanmax" (mean and max concatenated: small objects)
    stem_stride: int = 2  # spatial stride of the first stage (1 keeps full resolution for small shapes)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    total_steps: int = 400  # cosine schedule length

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.temporal_strides = tuple(int(s) for s in self.temporal_strides)
        self.class_of = tuple(self.class_of)
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"model.norm_groups={self.norm_groups} does not divide channels {self.channels}; "
                                 "pick a divisor of every entry (e.g. norm_groups: 8)")
        self.reverse_pairs = tuple(tuple(p) for p in self.reverse_pairs)
        self.mirror_pairs = tuple(tuple(p) for p in self.mirror_pairs)
        if self.pool not in ("mean", "meanmax"):
            raise ValueError(f"model.pool={self.pool!r} is not one of 'mean', 'meanmax'")
        if (self.reverse_pairs or self.mirror_pairs) and self.motion_attribute not in self.attributes:
            raise ValueError(f"model.reverse_pairs/mirror_pairs need attributes[{self.motion_attribute!r}]; "
                             "set them to [] for data without motion labels")
        for p in self.reverse_pairs + self.mirror_pairs:
            for v in p:
                if self.motion_attribute not in self.attributes or v not in self.attributes[self.motion_attribute]:
                    raise ValueError(f"model.reverse_pairs/mirror_pairs name {v!r}, which is not a value of "
                                     f"attributes[{self.motion_attribute!r}]; fix the pair or set it to []")
        if len(self.class_of) not in (0, 2) or (not self.class_of and not self.class_count):
            raise ValueError("model.class_of must name two attributes (class = a x b), or be [] with "
                             "model.class_count set (classes from labels only)")
        for a in self.class_of:
            if a not in self.attributes:
                raise ValueError(f"model.class_of names {a!r}, which is not in model.attributes "
                                 f"{list(self.attributes)}; add it or change class_of")
        halvings = len(self.channels) - (1 if self.stem_stride == 1 else 0)
        if self.resolution % 2 ** halvings:
            raise ValueError(f"model.resolution={self.resolution} must be divisible by 2^{halvings} "
                             f"(one halving per strided stage); pick e.g. {2 ** halvings * 4}")

    @property
    def num_classes(self) -> int:
        if not self.class_of:
            return int(self.class_count)
        a, b = self.class_of
        return len(self.attributes[a]) * len(self.attributes[b])

    @property
    def heads(self) -> dict[str, int]:
        return {"class": self.num_classes, **{k: len(v) for k, v in self.attributes.items()}}


def parse_caption(caption: str, attributes: dict[str, list[str]]) -> dict[str, int]:
    """Attribute indices named in a caption ("a red square moving left" -> shape/colour/direction), -1 if absent."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    out = {}
    for attr, values in attributes.items():
        hits = [i for i, v in enumerate(values) if v in words]
        out[attr] = hits[0] if len(hits) == 1 else -1
    return out


def fit_clip(video: Tensor, num_frames: int, resolution: int) -> Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C, num_frames, resolution, resolution]``: evenly spaced frames, area resize."""
    b, c, t, h, w = video.shape
    if t != num_frames:
        idx = torch.linspace(0, t - 1, num_frames).round().long().to(video.device)
        video = video.index_select(2, idx)
    if (h, w) != (resolution, resolution):
        x = rearrange(video, "b c t h w -> (b t) c h w")
        mode = "area" if h >= resolution and w >= resolution else "bilinear"
        x = F.interpolate(x, size=(resolution, resolution), mode=mode)
        video = rearrange(x, "(b t) c h w -> b c t h w", b=b)
    if c == 1:
        video = video.expand(-1, 3, -1, -1, -1)
    return video


class ConvStage(nn.Module):
    """3x3x3 conv, GroupNorm, SiLU; strided in space (and in time after the first stage while T > 2)."""

    def __init__(self, cin: int, cout: int, t_stride: int, s_stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, stride=(t_stride, s_stride, s_stride), padding=1)
        self.norm = GroupNorm(cout, groups)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.norm(self.conv(x)))


class VideoProbe(L.LightningModule):
    """3D-CNN classifier with one linear head per attribute over globally pooled features."""

    #: ``num_frames`` is the probe's own clip length (read at a random stride out of the longer data clip), not the
    #: data's: the CLI does not link it (vidgen/cli.py ``LINKED_KEYS``)
    unlinked_keys = ("num_frames",)

    def __init__(self, num_frames: int = 8, resolution: int = 32, channels: list[int] = (16, 32, 64),
                 norm_groups: int = 8, dropout: float = 0.1, attributes: dict[str, list[str]] | None = None,
                 class_of: list[str] = ("shape", "direction"), temporal_strides: list[int] = (1, 2),
                 noise_std: float = 0.0, motion_attribute: str = "direction",
                 reverse_pairs: list = (("left", "right"), ("up", "down")), mirror_pairs: list = (("left", "right"),),
                 pool: str = "meanmax", stem_stride: int = 2, class_count: int | None = None, lr: float = 2e-3,
                 weight_decay: float = 1e-4,
                 total_steps: int = 400):
        super().__init__()
        self.save_hyperparameters()
        self.config = cfg = ProbeConfig(
            num_frames=num_frames, resolution=resolution, channels=channels, norm_groups=norm_groups, dropout=dropout,
            attributes={k: list(v) for k, v in (DEMO_ATTRIBUTES if attributes is None else attributes).items()},
            class_of=class_of,
            temporal_strides=temporal_strides, noise_std=noise_std, motion_attribute=motion_attribute,
            reverse_pairs=reverse_pairs, mirror_pairs=mirror_pairs, pool=pool, stem_stride=stem_stride,
            class_count=class_count, lr=lr,
            weight_decay=weight_decay,
            total_steps=total_steps)
        stages, cin, t = [], 3, cfg.num_frames
        for i, c in enumerate(cfg.channels):
            ts = 2 if t > 2 and i > 0 else 1
            stages.append(ConvStage(cin, c, ts, cfg.stem_stride if i == 0 else 2, cfg.norm_groups))
            cin, t = c, math.ceil(t / ts)
        self.features = nn.Sequential(*stages)
        self.drop = nn.Dropout(cfg.dropout)
        feat = cin * (2 if cfg.pool == "meanmax" else 1)
        self.heads = nn.ModuleDict({name: nn.Linear(feat, n) for name, n in cfg.heads.items()})

    # ------------------------------------------------------------------------------------------------ inference
    def forward(self, video: Tensor) -> dict[str, Tensor]:
        """Logits per head for videos ``[B, C, T, H, W]`` in [-1, 1] (any T, H, W)."""
        x = fit_clip(video.float(), self.config.num_frames, self.config.resolution)
        f = self.features(x)
        h = f.mean(dim=(2, 3, 4))
        if self.config.pool == "meanmax":
            h = torch.cat([h, f.amax(dim=(2, 3, 4))], dim=1)
        h = self.drop(h)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, video: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
        """Predicted index per head, ``{head: int64 [B]}`` (eval mode, batched)."""
        was = self.training
        self.eval()
        outs = [self(video[i:i + batch_size]) for i in range(0, video.shape[0], batch_size)]
        self.train(was)
        return {k: torch.cat([o[k] for o in outs]).argmax(-1) for k in self.heads}

    # ------------------------------------------------------------------------------------------------- targets
    def targets(self, labels: Tensor | None = None, captions: list[str] | None = None) -> dict[str, Tensor]:
        """``{head: int64 [B]}`` with -1 where the label/caption does not say (those entries are not scored)."""
        cfg = self.config
        n = len(labels) if labels is not None else len(captions)
        out = {k: torch.full((n,), -1, dtype=torch.long) for k in cfg.heads}
        if captions is not None:
            for i, cap in enumerate(captions):
                for k, v in parse_caption(cap or "", cfg.attributes).items():
                    out[k][i] = v
        if not cfg.class_of:
            if labels is not None:
                lab = torch.as_tensor(labels, dtype=torch.long).cpu()
                out["class"] = torch.where((lab >= 0) & (lab < cfg.num_classes), lab, torch.full_like(lab, -1))
            return out
        a, b = cfg.class_of
        nb = len(cfg.attributes[b])
        if labels is not None:
            lab = torch.as_tensor(labels, dtype=torch.long).cpu()
            ok = (lab >= 0) & (lab < cfg.num_classes)
            out["class"] = torch.where(ok, lab, torch.full_like(lab, -1))
            out[a] = torch.where(ok, lab // nb, out[a])
            out[b] = torch.where(ok, lab % nb, out[b])
        else:
            both = (out[a] >= 0) & (out[b] >= 0)
            out["class"] = torch.where(both, out[a] * nb + out[b], out["class"])
        return out

    def chance(self) -> dict[str, float]:
        return {k: 1.0 / n for k, n in self.config.heads.items()}

    # -------------------------------------------------------------------------------------------------- training
    def _swap(self, y: Tensor, pairs: list[list[str]], m: Tensor) -> Tensor:
        """Direction indices with each named pair swapped where ``m`` (a mirrored or reversed clip)."""
        values = self.config.attributes[self.config.motion_attribute]
        y = y.clone()
        src = y.clone()
        for a, b in pairs:
            ia, ib = values.index(a), values.index(b)
            y[m & (src == ia)] = ib
            y[m & (src == ib)] = ia
        return y

    def _augment(self, video: Tensor, tgt: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Random temporal stride/start per batch; per clip, time reversal and horizontal mirroring with the motion
        labels swapped accordingly (``reverse_pairs``, ``mirror_pairs``); optional pixel noise."""
        cfg = self.config
        t = video.shape[2]
        strides = [s for s in cfg.temporal_strides if (cfg.num_frames - 1) * s + 1 <= t] or [max(1, t // cfg.num_frames)]
        s = strides[int(torch.randint(len(strides), ()))]
        span = (cfg.num_frames - 1) * s + 1
        start = int(torch.randint(max(1, t - span + 1), ()))
        video = video[:, :, start:start + span:s]
        tgt = dict(tgt)
        d = cfg.motion_attribute
        b = video.shape[0]
        for pairs, dim in ((cfg.reverse_pairs, 2), (cfg.mirror_pairs, 4)):
            if not pairs:
                continue
            m = torch.rand(b) < 0.5
            video = torch.where(m.view(b, 1, 1, 1, 1).to(video.device), video.flip(dim), video)
            tgt[d] = self._swap(tgt[d], pairs, m)
        if cfg.class_of and d in cfg.class_of and (cfg.reverse_pairs or cfg.mirror_pairs):
            a, c = cfg.class_of
            nb = len(cfg.attributes[c])
            ok = (tgt[a] >= 0) & (tgt[c] >= 0)
            tgt["class"] = torch.where(ok, tgt[a] * nb + tgt[c], tgt["class"])
        if cfg.noise_std > 0:
            video = video + cfg.noise_std * torch.randn_like(video)
        return video, tgt

    def _loss(self, logits: dict[str, Tensor], tgt: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, accs = 0.0, {}
        for k, lg in logits.items():
            y = tgt[k].to(lg.device)
            m = y >= 0
            if m.any():
                loss = loss + F.cross_entropy(lg[m], y[m])
                accs[k] = (lg[m].argmax(-1) == y[m]).float().mean()
        return loss, accs

    def training_step(self, batch: dict, batch_idx: int):
        tgt = self.targets(batch.get("label"), batch.get("text"))
        video, tgt = self._augment(batch["video"], tgt)
        logits = self(video)
        loss, accs = self._loss(logits, tgt)
        bs = batch["video"].shape[0]
        log_step(self, {"train/loss": loss, **{f"train/acc_{k}": v for k, v in accs.items()}}, bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        batch, bs = eval_rows(batch)  # DDP padding dropped (all padding: one row logged with weight 0)
        tgt = self.targets(batch.get("label"), batch.get("text"))
        video = batch["video"][:, :, : self.config.num_frames]  # the first frames at the data's own stride
        logits = self(video)
        loss, accs = self._loss(logits, tgt)
        self.log("val/loss", loss, batch_size=bs, sync_dist=True)
        for k, v in accs.items():
            self.log(f"val/acc_{k}", v, batch_size=bs, sync_dist=True, prog_bar=k == "class")

    def configure_optimizers(self):
        cfg = self.config
        opt = cpu_multi_tensor(torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))
        total = max(1, cfg.total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None, generator=None) -> Tensor:
        """A classifier generates nothing: returns the input clips (so sample logging callbacks still work)."""
        if batch is None:
            raise ValueError("VideoProbe classifies videos; pass batch={'video': ...}")
        video = batch["video"]
        return video[:num_samples] if num_samples else video

    @classmethod
    def load_probe(cls, path: str) -> "VideoProbe":
        """A probe from a Lightning checkpoint (weights-only load), in eval mode."""
        from vidgen.lightning_modules.nn.checkpoint import EMA_PREFIX, ema_state_dict, raw_state_dict, safe_load

        ck = safe_load(path)
        hp = dict(ck.get("hyper_parameters") or {})
        model = cls(**hp)
        sd = ck.get("state_dict", ck)
        has_ema = any(k.startswith(EMA_PREFIX) for k in sd)
        model.load_state_dict(ema_state_dict(ck) if has_ema else raw_state_dict(ck), strict=True)
        return model.eval()


# Sizes: tiny = the demo probe (8x32^2, ~70k parameters); base = UCF-101-style CAS probe (16x112^2).
PROBE_SIZES = {
    "tiny": {"num_frames": 8, "resolution": 32, "channels": [16, 32, 64]},
    "base": {"num_frames": 16, "resolution": 112, "channels": [32, 64, 128, 256]},
}
