"""The evaluation suite beside FVD (issue 10 §3): video Inception Score (C3D, UCF-101), CLIPSIM, FID over frames,
probe accuracy.

Every metric is a torchmetrics ``Metric`` whose states are float64 sums (or per-sample rows with their global sample
index), so 1 and N processes give the same value for the same samples. They share FVD's clip reading
(:func:`vidgen.callbacks.fvd.iter_clips`: rank-strided global indices) and its distributed helpers, and are driven by
``vidgen eval`` and :class:`vidgen.callbacks.metrics.EvalCallback` (which reuses FVD's generate/EMA loop).

Protocols (pinned here, and in the README table):

- **IS** (TGAN2 / StyleGAN-V ``isv2048_ucf``): the first 16 frames; each frame bilinearly resized (corners aligned) to
  112 x 112 from [-1, 1]; TGAN2's C3D (``vidgen.lightning_modules.nn.c3d``); ``softmax(fc8)``; the probabilities are
  ordered by sample index, shuffled with ``numpy.random.RandomState(42)``, cut into 10 contiguous splits;
  ``IS = exp(mean_x KL(p(y|x) || p(y)))`` per split; mean and (population) std over splits.
- **CLIPSIM** (GODIVA / Make-A-Video / VideoPoet): every frame resized (short side, bicubic) and centre-cropped to the
  CLIP input size, normalised with CLIP's mean/std; cosine similarity between the frame's and the caption's CLIP
  embeddings, averaged over frames, then over clips (no x100 scaling, no clamping).
- **FID over frames** (:class:`FrameFID`): the first 16 frames of each clip, every frame an image: uint8 RGB at the
  clip's own size, resized to 299 x 299 inside the network by torch-fidelity's TF1-compatible bilinear (what
  pytorch-fid / torchmetrics / the TF original feed), the standard FID InceptionV3 (``pt_inception-2015-12-05``
  weights, torch-fidelity's ``FeatureExtractorInceptionV3``) pool3 2048-d features; Fréchet distance of the frame
  features (FVD's :class:`~vidgen.callbacks.fvd.FrechetFeatureDistance`: the same float64 sums, real-statistics
  cache and distributed code). 2048 clips per side by default (32768 frames).
- **Accuracy**: the probe (:class:`vidgen.lightning_modules.probe.VideoProbe`) per head: class / shape / colour /
  direction, from labels and/or captions.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from vidgen.callbacks.fvd import FeatureStats, FrechetFeatureDistance, FVDCallback, _dist, expand_sources

IS_NUM_FRAMES = 16
IS_RESOLUTION = 112
IS_NUM_SPLITS = 10
IS_SHUFFLE_SEED = 42
IS_PROTOCOL = ("vidgen-is/1: C3D-UCF101 (TGAN2) softmax(fc8), first 16 frames, bilinear align_corners 112x112 from "
               "[-1,1], RandomState(42) shuffle, 10 splits, mean/std")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIPSIM_PROTOCOL = "vidgen-clipsim/1: every frame, CLIP resize+centre crop, cosine(frame, caption), mean over frames then clips"
FID_NUM_FRAMES = 16
FID_RESOLUTION = 299  # inside the network (torch-fidelity's TF1-compatible bilinear from uint8)
FID_FEATURE_DIM = 2048
FID_NUM_SAMPLES = 2048  # clips per side
FID_PROTOCOL = ("vidgen-fid/1: InceptionV3 pt_inception-2015-12-05 pool3 2048-d (torch-fidelity), first {frames} frames "
                "of each clip, uint8 RGB frames at their own size, TF1 bilinear to 299x299 in the network")


# ------------------------------------------------------------------------------------------------------------ IS
def inception_score(probs: Any, num_splits: int = 1, shuffle_seed: int | None = None) -> tuple[float, float]:
    """``(mean, std)`` over ``num_splits`` contiguous splits of ``exp(E_x KL(p(y|x) || p(y)))`` (float64).

    ``probs``: ``[N, K]`` class probabilities in sample order; ``shuffle_seed``: permute the rows first with
    ``numpy.random.RandomState(seed)`` (StyleGAN-V shuffles with 42). ``0 log 0`` counts as 0."""
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, Tensor) else probs).detach().cpu().double()
    if p.ndim != 2 or p.shape[0] < num_splits:
        raise ValueError(f"inception_score needs [N >= num_splits, K] probabilities, got {tuple(p.shape)}")
    if shuffle_seed is not None:
        p = p[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(p.shape[0]))]
    n = p.shape[0]
    scores = []
    for i in range(num_splits):
        part = p[i * n // num_splits:(i + 1) * n // num_splits]
        marginal = part.mean(0, keepdim=True)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal.expand_as(part))).sum(1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def resize_frames(video: Tensor, size: int, num_frames: int | None, align_corners: bool) -> Tensor:
    """``[B, C, T, H, W]`` in [-1, 1] -> the first ``num_frames`` frames, RGB, bilinear ``size`` x ``size``."""
    if video.ndim != 5:
        raise ValueError(f"expected videos [B, C, T, H, W] in [-1, 1], got {tuple(video.shape)}")
    if num_frames is not None:
        if video.shape[2] < num_frames:
            raise ValueError(f"the protocol uses {num_frames} frames per clip; the videos have T={video.shape[2]}")
        video = video[:, :, :num_frames]
    x = video.float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = repeat(x, "b 1 t h w -> b 3 t h w")
    if x.shape[-2:] != (size, size):
        b = x.shape[0]
        f = F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), size=(size, size), mode="bilinear",
                          align_corners=align_corners)
        x = rearrange(f, "(b t) c h w -> b c t h w", b=b)
    return x.contiguous()


class _Indexed(Metric):
    """Rows kept with their global sample index (``cat`` states), reordered by index at compute: rank-independent."""

    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self._seen = 0

    def _indices(self, n: int, index: Tensor | None) -> Tensor:
        if index is not None:
            return torch.as_tensor(index, dtype=torch.long).flatten()
        rank, world = _dist()
        idx = (torch.arange(self._seen, self._seen + n) * world + rank).long()
        self._seen += n
        return idx

    def _add(self, rows: Tensor, index: Tensor | None) -> None:
        idx = self._indices(rows.shape[0], index)
        if idx.numel() != rows.shape[0]:
            raise ValueError(f"{idx.numel()} indices for {rows.shape[0]} samples")
        self.rows.append(rows.detach().double())
        self.index.append(idx.to(rows.device))

    def ordered(self) -> Tensor:
        rows, idx = dim_zero_cat(self.rows), dim_zero_cat(self.index)
        return rows[torch.argsort(idx)]

    def reset(self) -> None:
        super().reset()
        self._seen = 0


class VideoInceptionScore(_Indexed):
    """Video IS with the UCF-101 C3D (see the module protocol); ``compute()`` -> ``tensor([mean, std])``.

    ``classifier``: a module mapping [-1, 1] clips ``[B, 3, 16, 112, 112]`` to logits (normally
    :func:`vidgen.lightning_modules.nn.c3d.load_c3d`), a path for it, or None to feed probabilities ``[B, K]``.
    ``update(x, index=None)``: videos (run through the classifier) or probabilities; ``index`` = global sample
    indices (default: this rank's running count, strided by the world size)."""

    higher_is_better = True
    is_differentiable = False

    def __init__(self, classifier: nn.Module | str | os.PathLike | None = None, num_splits: int = IS_NUM_SPLITS,
                 shuffle_seed: int | None = IS_SHUFFLE_SEED, num_frames: int = IS_NUM_FRAMES,
                 resolution: int = IS_RESOLUTION, mean_path: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(classifier, (str, os.PathLike)):
            from vidgen.lightning_modules.nn.c3d import load_c3d

            classifier = load_c3d(classifier, mean_path)
        self.classifier = classifier
        if classifier is not None:
            classifier.eval().requires_grad_(False)
        self.num_splits, self.shuffle_seed = num_splits, shuffle_seed
        self.num_frames, self.resolution = num_frames, resolution

    def prepare(self, video: Tensor) -> Tensor:
        """The protocol's frames and size for one batch (C3D's own resize, corners aligned)."""
        return resize_frames(video, self.resolution, self.num_frames, align_corners=True)

    @torch.no_grad()
    def probabilities(self, video: Tensor) -> Tensor:
        if self.classifier is None:
            raise ValueError("this VideoInceptionScore has no classifier: pass probabilities [B, K], or build it "
                             "with classifier=load_c3d('c3d_ucf101.pt')")
        x = self.prepare(video)
        dev = next(iter(self.classifier.parameters()), x).device
        return torch.softmax(self.classifier(x.to(dev)).double(), dim=-1)

    def update(self, x: Tensor, index: Tensor | None = None) -> None:  # type: ignore[override]
        p = self.probabilities(x) if x.ndim == 5 else torch.as_tensor(x).double()
        if p.ndim != 2:
            raise ValueError(f"expected videos [B, C, T, H, W] or probabilities [B, K], got {tuple(p.shape)}")
        self._add(p, index)

    def compute(self) -> Tensor:
        mean, std = inception_score(self.ordered(), self.num_splits, self.shuffle_seed)
        return torch.tensor([mean, std], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------- CLIPSIM
class CLIPSimilarity(Metric):
    """CLIPSIM: mean over clips of the mean over frames of cos(CLIP image(frame), CLIP text(caption)).

    ``model``: an object with ``encode_image(images [N, 3, S, S]) -> [N, D]`` and ``encode_text(tokens) -> [B, D]``
    (an open_clip model, see :func:`load_open_clip`), with ``tokenizer(list[str]) -> tokens``; or None to feed
    embeddings: ``update(image_emb [B, T, D], text_emb [B, D])``. States are float64 sums (DDP-exact)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, model: Any = None, tokenizer: Any = None, image_size: int = 224,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD, frame_batch: int = 64,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.model, self.tokenizer = model, tokenizer
        self.image_size, self.frame_batch = image_size, frame_batch
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def prepare(self, video: Tensor) -> Tensor:
        """[-1, 1] ``[B, C, T, H, W]`` -> CLIP input frames ``[B*T, 3, S, S]`` (short side bicubic, centre crop)."""
        b, c, t, h, w = video.shape
        x = (rearrange(video.float().clamp(-1, 1), "b c t h w -> (b t) c h w") + 1) / 2
        if c == 1:
            x = x.expand(-1, 3, -1, -1)
        s = self.image_size
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[:, :, top:top + s, left:left + s]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def embeddings(self, video: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        if self.model is None or self.tokenizer is None:
            raise ValueError("this CLIPSimilarity has no CLIP model: pass embeddings, or build it with "
                             "model, tokenizer = load_open_clip('ViT-B-32', 'open_clip_vit_b32.bin')")
        b, t = video.shape[0], video.shape[2]
        frames = self.prepare(video)
        img = torch.cat([self.model.encode_image(frames[i:i + self.frame_batch])
                         for i in range(0, frames.shape[0], self.frame_batch)])
        txt = self.model.encode_text(self.tokenizer(list(captions)).to(frames.device))
        return rearrange(img, "(b t) d -> b t d", b=b, t=t), txt

    def update(self, x: Tensor, text: Tensor | list[str]) -> None:  # type: ignore[override]
        """``(videos [B, C, T, H, W], captions)`` or ``(image embeddings [B, T, D], text embeddings [B, D])``."""
        if x.ndim == 5:
            img, txt = self.embeddings(x, text)
        else:
            img, txt = x, torch.as_tensor(text)
        if img.ndim != 3 or txt.ndim != 2 or img.shape[0] != txt.shape[0]:
            raise ValueError(f"expected image embeddings [B, T, D] and text embeddings [B, D], got "
                             f"{tuple(img.shape)} and {tuple(txt.shape)}")
        cos = F.cosine_similarity(img.double(), txt.double()[:, None, :], dim=-1)  # [B, T]
        self.total += cos.mean(1).sum().to(self.total.device)
        self.n += img.shape[0]

    def compute(self) -> Tensor:
        if self.n == 0:
            raise ValueError("CLIPSIM of no clips")
        return self.total / self.n


def _local_weights(path: str | os.PathLike, what: str, module: str, install: str):
    """``module`` imported, after checking that the weights ``path`` is a local file (weights are never downloaded)."""
    import importlib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {os.fspath(path)!r} not found: give a local file (weights are never "
                                "downloaded)")
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError(f"{what.split()[0]} needs {module}: pip install {install}") from e


def load_open_clip(arch: str, checkpoint: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, tokenizer, image_size, mean, std)`` of an open_clip model from a LOCAL checkpoint file
    (ViT-B-32 / ViT-B-16 are the papers' networks; weights are never downloaded)."""
    open_clip = _local_weights(checkpoint, "CLIP checkpoint (e.g. open_clip_pytorch_model.bin of ViT-B-32)",
                               "open_clip", "open_clip_torch")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=os.fspath(checkpoint), device=device)
    model.eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD
    return model, open_clip.get_tokenizer(arch), size, tuple(mean), tuple(std)


# ------------------------------------------------------------------------------------------------------ FID
def load_fid_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The standard FID InceptionV3 (torch-fidelity's ``FeatureExtractorInceptionV3``, pool3 ``"2048"`` features)
    with the ``pt_inception-2015-12-05`` weights from a LOCAL file (never downloaded).

    The file is read with ``weights_only`` (:func:`~vidgen.lightning_modules.nn.checkpoint.safe_load`); torch-fidelity
    then gets those tensors re-serialised in memory (it unpickles its path without ``weights_only``) and loads them
    strictly, so a file with other keys or shapes is refused."""
    import io

    from vidgen.lightning_modules.nn.checkpoint import read_state_dict

    fe = _local_weights(path, "FID InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth, as torch-fidelity and "
                              "pytorch-fid use)", "torch_fidelity.feature_extractor_inceptionv3", "'vidgen[fid]'")
    buf = io.BytesIO()
    torch.save(read_state_dict(path), buf)
    buf.seek(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    if net.INPUT_IMAGE_SIZE != FID_RESOLUTION:  # pragma: no cover - a torch-fidelity that changed the protocol
        raise RuntimeError(f"torch-fidelity's InceptionV3 resizes to {net.INPUT_IMAGE_SIZE}, the FID protocol to "
                           f"{FID_RESOLUTION}; pin torch-fidelity to a version with the standard 299 x 299 input")
    return net.to(device).eval().requires_grad_(False)


def fid_frames(video: Tensor, num_frames: int) -> Tensor:
    """``[B, C, T, H, W]`` in [-1, 1] -> the first ``num_frames`` frames, RGB, on the uint8 grid (still [-1, 1]
    floats ``k / 127.5 - 1``, rounded as ``media.to_uint8``), so preparing twice changes nothing."""
    if video.ndim != 5:
        raise ValueError(f"FID expects videos [B, C, T, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    if video.shape[2] < num_frames:
        raise ValueError(f"FID uses the first {num_frames} frames of each clip; the videos have T={video.shape[2]}")
    x = video[:, :, :num_frames].float()
    if x.shape[1] == 1:
        x = repeat(x, "b 1 t h w -> b 3 t h w")
    return (((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1).contiguous()


class FrameFID(FrechetFeatureDistance):
    """FID over frames: every one of the first ``num_frames`` frames of a clip is an image (see the module protocol).

    ``feature_extractor``: the FID InceptionV3 (:func:`load_fid_inception`, or a path for it), any module mapping
    uint8 images ``[N, 3, H, W]`` to ``[N, D]`` (or a tuple whose first entry is that), or None to feed features.
    ``update(x, real=...)``: videos ``[B, C, T, H, W]`` in [-1, 1] (``B * num_frames`` feature rows) or frame
    features ``[N, D]``. Streaming float64 sums, real-statistics files and DDP reduction are FVD's."""

    what = "frames"
    build_hint = "load_fid_inception('pt_inception-2015-12-05-6726825d.pth')"

    def __init__(self, feature_extractor: nn.Module | str | os.PathLike | None = None, num_features: int | None = None,
                 real_stats: FeatureStats | str | os.PathLike | None = None, num_frames: int = FID_NUM_FRAMES,
                 **kwargs: Any):
        if isinstance(feature_extractor, (str, os.PathLike)):
            feature_extractor = load_fid_inception(feature_extractor)
        super().__init__(feature_extractor, num_features or FID_FEATURE_DIM, real_stats, **kwargs)
        self.num_frames = self.rows_per_clip = int(num_frames)
        self.protocol = FID_PROTOCOL.format(frames=self.num_frames)

    def prepare(self, videos: Tensor) -> Tensor:
        return fid_frames(videos, self.num_frames)

    def network_input(self, prepared: Tensor) -> Tensor:
        """Prepared clips -> uint8 images ``[(B T), 3, H, W]`` (clip-major), what the FID InceptionV3 takes."""
        return rearrange(((prepared + 1) * 127.5).round().to(torch.uint8), "b c t h w -> (b t) c h w")


# ------------------------------------------------------------------------------------------------------ accuracy
class ProbeAccuracy(Metric):
    """Classification accuracy of generated clips per probe head (Classification Accuracy Score idea).

    ``probe``: a :class:`VideoProbe` or its checkpoint path. ``update(videos, labels=None, captions=None)``: the
    requested class and/or captions; heads without a target for a sample skip it. ``compute()`` ->
    ``{head: accuracy}``. States are per-head sums (DDP-exact)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, probe: Any, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(probe, (str, os.PathLike)):
            from vidgen.lightning_modules.probe import VideoProbe

            probe = VideoProbe.load_probe(os.fspath(probe))
        self.probe = probe.eval()
        self.heads = list(probe.config.heads)
        self.add_state("correct", torch.zeros(len(self.heads), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.heads), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, videos: Tensor, labels: Tensor | None = None, captions: list[str] | None = None) -> None:  # type: ignore[override]
        if labels is None and captions is None:
            raise ValueError("ProbeAccuracy needs the requested labels and/or captions of the samples")
        pred = self.probe.predict(videos.float())
        tgt = self.probe.targets(labels, captions)
        for i, k in enumerate(self.heads):
            m = tgt[k] >= 0
            self.correct[i] += (pred[k].cpu()[m] == tgt[k][m]).sum().double().to(self.correct.device)
            self.total[i] += m.sum().double().to(self.total.device)

    def compute(self) -> dict[str, Tensor]:
        return {k: self.correct[i] / self.total[i] for i, k in enumerate(self.heads) if self.total[i] > 0}


# ------------------------------------------------------------------------------------------------------ callback
class EvalCallback(FVDCallback):
    """Every ``every_n_steps`` steps: samples from ``pl_module.generate()`` (EMA weights, the validation batches'
    labels/captions, re-seeded generator: FVD's loop, :meth:`FVDCallback._samples`) scored by IS / CLIPSIM / FID over
    frames / probe accuracy, logged as ``val/is``, ``val/clipsim``, ``val/fid``, ``val/acc_<head>``. Under DDP each
    rank generates its share; the metrics sync.

    ``c3d_path`` (+ ``c3d_mean``) enables IS, ``clip_checkpoint`` (+ ``clip_arch``) CLIPSIM (needs captions in the
    batches), ``inception_path`` FID over frames (``fid_frames`` per clip; real statistics from ``real_stats_path``,
    else the first ``num_samples`` clips of ``real_shards`` (cached), else the validation batches' own videos, as
    :class:`FVDCallback`), ``probe_path`` accuracy (needs labels or captions). FVD stays with :class:`FVDCallback`."""

    def __init__(self, every_n_steps: int = 5000, num_samples: int = 2048, c3d_path: str | None = None,
                 c3d_mean: str | None = None, is_splits: int = IS_NUM_SPLITS, clip_arch: str = "ViT-B-32",
                 clip_checkpoint: str | None = None, probe_path: str | None = None, use_ema: bool = True,
                 batch_size: int = 8, seed: int = 0, pass_batches: bool | None = None,
                 inception_path: str | None = None, fid_frames: int = FID_NUM_FRAMES,
                 real_shards: str | list[str] | None = None, real_stats_path: str | None = None,
                 cache_dir: str | None = None):
        Callback.__init__(self)
        if not (c3d_path or clip_checkpoint or probe_path or inception_path):
            raise ValueError("EvalCallback: set at least one of c3d_path (IS), clip_checkpoint (CLIPSIM), "
                             "inception_path (FID), probe_path (accuracy)")
        for name, path in (("c3d_path", c3d_path), ("c3d_mean", c3d_mean), ("clip_checkpoint", clip_checkpoint),
                           ("probe_path", probe_path), ("inception_path", inception_path)):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"EvalCallback: {name} {path!r} is not a file (weights load from local paths)")
        if every_n_steps < 1 or num_samples < 1 or batch_size < 1 or fid_frames < 1:
            raise ValueError("EvalCallback needs every_n_steps, num_samples, batch_size and fid_frames >= 1")
        if inception_path and real_stats_path and not os.path.isfile(real_stats_path) and not real_shards:
            raise FileNotFoundError(f"EvalCallback: real_stats_path {real_stats_path} does not exist and no "
                                    "real_shards are given to compute it; set real_shards or make the file with "
                                    "`vidgen eval --metrics fid --real SHARDS --real-stats FILE`")
        if real_shards is not None:
            expand_sources(real_shards)  # fail now on a bad pattern
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.c3d_path, self.c3d_mean, self.is_splits = c3d_path, c3d_mean, is_splits
        self.clip_arch, self.clip_checkpoint, self.probe_path = clip_arch, clip_checkpoint, probe_path
        self.inception_path, self.fid_frames = inception_path, fid_frames
        self.real_shards, self.real_stats_path, self.cache_dir = real_shards, real_stats_path, cache_dir
        self.use_ema, self.pass_batches = use_ema, pass_batches
        self.metrics: dict[str, Metric] | None = None
        self.last_values: dict[str, float] = {}
        self._last_step = -1
        self._warned: set[str] = set()

    def _ensure_metrics(self, pl_module) -> dict[str, Metric]:
        if self.metrics is None:  # not submodules of pl_module: never checkpointed, never sharded
            self.metrics = {}
            if self.c3d_path:
                self.metrics["is"] = VideoInceptionScore(self.c3d_path, num_splits=self.is_splits,
                                                         mean_path=self.c3d_mean)
            if self.clip_checkpoint:
                model, tok, size, mean, std = load_open_clip(self.clip_arch, self.clip_checkpoint)
                self.metrics["clipsim"] = CLIPSimilarity(model, tok, size, mean, std)
            if self.inception_path:
                self.metrics["fid"] = FrameFID(self.inception_path, num_frames=self.fid_frames)
            if self.probe_path:
                self.metrics["acc"] = ProbeAccuracy(self.probe_path)
        return {k: m.to(pl_module.device) for k, m in self.metrics.items()}

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        metrics = self._ensure_metrics(pl_module)
        for m in metrics.values():
            m.reset()
        fid_real = "fid" in metrics and self._real_stats(trainer, metrics["fid"])
        if "fid" in metrics and not fid_real and self.pass_batches is False:
            raise ValueError("EvalCallback: FID has no real statistics: set real_stats_path or real_shards")
        for batch, video, index in self._samples(trainer, pl_module):
            n = video.shape[0]
            batch = batch or {}
            if "is" in metrics:
                metrics["is"].update(video, index=index)
            texts = batch.get("text")
            if "clipsim" in metrics and texts is not None and all(texts[:n]):
                metrics["clipsim"].update(video, list(texts[:n]))
            if "fid" in metrics:
                if not fid_real and batch.get("video") is None:
                    raise ValueError("EvalCallback: FID without real statistics needs the validation batches' videos")
                metrics["fid"].update(video, real=False)
                if not fid_real:
                    metrics["fid"].update(batch["video"], real=True)
            if "acc" in metrics and (batch.get("label") is not None or texts is not None):
                labels = batch.get("label")
                metrics["acc"].update(video, labels=None if labels is None else labels[:n].cpu(),
                                      captions=None if texts is None else list(texts[:n]))
        values: dict[str, float] = {}
        if "is" in metrics:
            values["is"] = float(metrics["is"].compute()[0])
        if "clipsim" in metrics and float(metrics["clipsim"].n) > 0:
            values["clipsim"] = float(metrics["clipsim"].compute())
        if "fid" in metrics:
            values["fid"] = float(metrics["fid"].compute())
        if "acc" in metrics:
            values.update({f"acc_{k}": float(v) for k, v in metrics["acc"].compute().items()})
        self.last_values = values
        return values
