"""What every generator stage of the demo shares: in-memory demo clips and :func:`report_samples`.

The stage contract (``vidgen.demo.STAGES``): a stage is ``run(ctx) -> dict``. A generator stage samples clips for
requested classes / captions / conditioning videos and hands them to :func:`report_samples`, which

- writes ``<out>/<stage>/samples.npz``: ``videos`` uint8 ``[N, T, H, W, 3]`` plus whatever conditioned them
  (``labels`` int64 ``[N]``, ``captions`` str ``[N]``, ``cond_videos`` uint8 ``[N, T', H', W', 3]`` or ``cond_<key>``)
  and the probe's predictions (``probe_<head>`` int64 ``[N]``), so anyone can evaluate the samples independently;
- writes ``<out>/<stage>/samples.png`` (one row per sample, the requested class/caption and the probe's reading next
  to it) and ``samples.mp4`` (the same clips tiled);
- scores the samples with the demo's probe (``ctx.results["probe"]``, trained on real clips first) and returns the
  summary entries: ``probe`` = ``{head: {"accuracy", "ceiling" (the probe on real val clips), "chance", "n"}}``.

Merge its dict into the stage's own: ``res = {...}; res.update(report_samples(...)); res["outputs"] = mine + rep``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

_PROBES: dict[str, object] = {}
_CLIPS: dict[tuple, dict] = {}
_TOKENS: dict[str, dict] = {}
CLIP_CACHE = ".clip_cache"  # under the demo's out_dir: decoded clips shared by the stages of one run

# The clip length every token-space stage (MAGVIT, VideoPoet LM, SR, audio) models and the tokenizer stage reports
# on: 8 frames. Not the tokenizer checkpoint's ``num_frames``, which is its training window (4-frame windows of these
# clips; a convolutional tokenizer codes any multiple of its temporal downsampling).
CLIP_FRAMES = 8


# ------------------------------------------------------------------------------------------------------ demo data
def manifest(ctx) -> dict:
    return json.loads((Path(ctx.data_dir) / "manifest.json").read_text())


def class_names(ctx) -> list[str]:
    try:
        return list(manifest(ctx).get("classes", []))
    except FileNotFoundError:
        return []


def load_clips(ctx, split: str, num_frames: int, resolution: int, frame_stride: int = 1,
               procedural_only: bool = False, max_clips: int | None = None, share: bool = True) -> dict:
    """Every clip of a demo split, decoded once and kept in memory: ``{"video": [N,3,T,R,R], "label", "text"}``.

    The first ``num_frames`` frames at ``frame_stride``, centre-cropped and resized to ``resolution`` through the
    ordinary ``VideoDataModule`` path, cached per process and on disk under ``<out_dir>/.clip_cache/`` (the stages
    run in their own processes; most decode the same clips: ~3.5 CPU-s each for the train split; ``share=False``
    for clips no other stage reads). Neither path touches the global torch / random / numpy generators, so a stage's
    results do not depend on which stage decoded first. ``vidgen demo`` removes the folder when it ends."""
    key = (str(Path(ctx.data_dir).resolve()), split, num_frames, resolution, frame_stride)
    disk = _clip_cache_file(ctx, split, num_frames, resolution, frame_stride) if share else None
    if key not in _CLIPS and disk is not None and disk.exists():
        try:
            _CLIPS[key] = torch.load(disk, weights_only=True)
        except Exception:  # a damaged cache file: decode again (and rewrite it)
            pass
    if key not in _CLIPS:
        with _rng_untouched():  # decoding draws from the global RNGs: a cache hit must leave them as a decode does
            _CLIPS[key] = _decode_clips(ctx, split, num_frames, resolution, frame_stride)
        if disk is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_name(f"{disk.name}.{os.getpid()}.tmp")  # stages decoding the same clips at once
            torch.save(_CLIPS[key], tmp)
            tmp.replace(disk)
    c = _CLIPS[key]
    idx = torch.arange(len(c["label"]))
    if procedural_only:
        idx = idx[(c["label"] >= 0) & (c["label"] < int(manifest(ctx).get("procedural_classes", 12)))]
    if max_clips is not None:
        idx = idx[:max_clips]
    return {"video": c["video"][idx], "label": c["label"][idx], "text": [c["text"][i] for i in idx.tolist()],
            "key": [c["key"][i] for i in idx.tolist()], "frame_stride": frame_stride}


def _decode_clips(ctx, split: str, num_frames: int, resolution: int, frame_stride: int) -> dict:
    from vidgen.datamodules import VideoDataModule

    dm = VideoDataModule(val_shards=str(Path(ctx.data_dir) / split), seed=getattr(ctx, "seed", 0),
                         num_frames=num_frames, frame_stride=frame_stride, resolution=resolution, crop="center",
                         flip=False, batch_size=32, num_workers=0, shuffle=False)
    dm.setup("validate")
    vids, labels, texts, keys, seen = [], [], [], [], set()
    for b in dm.val_dataloader():
        if b["video"].shape[2] != num_frames:  # images (T=1) are not clips
            continue
        for i, k in enumerate(b["key"]):
            if k not in seen:  # the loader pads its last batch with repeats
                seen.add(k)
                keys.append(k)
                vids.append(b["video"][i])
                labels.append(int(b["label"][i]))
                texts.append(b["text"][i])
    return {"video": torch.stack(vids), "label": torch.tensor(labels), "text": texts, "key": keys}


@contextlib.contextmanager
def _rng_untouched():
    """Restore the global torch (CPU), ``random`` and numpy generators on exit."""
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])


def _clip_cache_file(ctx, split: str, num_frames: int, resolution: int, frame_stride: int) -> Path | None:
    """Where :func:`load_clips` keeps a split's decoded clips for the other stages: named by the decoding settings
    and by the shards' names, sizes and modification times (rebuilt data gets a new file). None without an
    ``out_dir`` or shards."""
    out, shards = getattr(ctx, "out_dir", None), Path(ctx.data_dir) / split
    if out is None or not shards.is_dir():
        return None
    files = sorted(shards.glob("*.tar"))
    if not files:
        return None
    sig = hashlib.sha1(repr([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode())
    return Path(out) / CLIP_CACHE / f"{split}_{num_frames}x{resolution}_s{frame_stride}_{sig.hexdigest()[:12]}.pt"


# ----------------------------------------------------------------------------------------------------- token cache
def save_clip_tokens(ctx, tok, path: str | Path, splits=("train", "val")) -> str:
    """Tokenise every clip of ``splits`` (``CLIP_FRAMES`` frames at the tokenizer's resolution) once and save
    ``{"frames", "resolution", "frame_stride", "codes": {key: [t, h, w]}}`` at ``path``: the token-space stages
    (MAGVIT, VideoPoet, its SR and audio) read them through :func:`clip_tokens` instead of each encoding the same
    clips again. A clip's codes do not depend on the batch it is encoded in (tests/test_demo_jobs.py), so the cache
    changes no result."""
    R = int(tok.resolution)
    codes: dict[str, torch.Tensor] = {}
    for split in splits:
        clips = load_clips(ctx, split, CLIP_FRAMES, R)
        codes.update(zip(clips["key"], encode_clips(tok, clips["video"])))
    tmp = Path(str(path) + ".tmp")
    torch.save({"frames": CLIP_FRAMES, "resolution": R, "frame_stride": 1, "codes": codes}, tmp)
    tmp.replace(path)
    return str(path)


@torch.no_grad()
def encode_clips(tok, video: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``tok.encode`` over ``video [N, 3, T, H, W]``, ``batch_size`` clips at a time."""
    return torch.cat([tok.encode(v) for v in video.split(batch_size)])


def clip_tokens(ctx, tok, clips: dict) -> torch.Tensor:
    """The codes of ``clips`` (a :func:`load_clips` dict) for the tokenizer stage's checkpoint: read from the cache
    that stage left (``ctx.results["tokenizer"]["tokens"]``) when it holds every clip at this length, resolution and
    frame stride, else encoded here."""
    path = ((getattr(ctx, "results", {}) or {}).get("tokenizer", {}) or {}).get("tokens")
    T, R = clips["video"].shape[2], clips["video"].shape[-1]
    if path and Path(path).exists() and clips.get("key"):
        if path not in _TOKENS:
            _TOKENS[path] = torch.load(path, weights_only=True)
        cache = _TOKENS[path]
        stride = clips.get("frame_stride", 1)
        same = (cache["frames"], cache["resolution"], cache.get("frame_stride", 1)) == (T, R, stride)
        if same and all(k in cache["codes"] for k in clips["key"]):
            return torch.stack([cache["codes"][k] for k in clips["key"]])
    return encode_clips(tok, clips["video"])


class CaptionTable:
    """Every distinct caption embedded once by the frozen MiniLM encoder (never per step); calling it with captions
    gives ``(embeddings [N, slots, D], valid lengths [N])``, ``slots`` = the longest caption's token count."""

    def __init__(self, captions, max_length: int = 16):
        from vidgen.lightning_modules.nn.text_encoders import MiniLMTextEncoder

        self.encoder = MiniLMTextEncoder(max_length=max_length)
        caps = sorted(set(captions))
        enc = self.encoder(caps)
        self.slots = int(enc.mask.sum(-1).max())
        self.table = {c: (enc.tokens[i, :self.slots].float(), int(enc.mask[i].sum())) for i, c in enumerate(caps)}

    def __len__(self) -> int:
        return len(self.table)

    def __call__(self, caps) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([self.table[c][0] for c in caps]), torch.tensor([self.table[c][1] for c in caps])


def stage_trainer(run_dir: str | Path, *, callbacks=(), **kwargs):
    """A CPU ``Trainer`` with the CLI's run layout (``vidgen.runtime.run_layout``): the final state in
    ``<run_dir>/checkpoints/last.ckpt`` (written atomically; what ``stage_checkpoint`` hands to later stages),
    TensorBoard in ``<run_dir>/tb/``, nothing under ``lightning_logs/``. ``kwargs`` go to the ``Trainer``."""
    import lightning as L

    from vidgen.runtime import run_layout

    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    return L.Trainer(accelerator="cpu", devices=1, **run_layout(str(run_dir), list(callbacks)), **kwargs)


def last_checkpoint(run_dir: str | Path) -> str:
    """``<run_dir>/checkpoints/last.ckpt``: where :func:`stage_trainer` leaves the final state."""
    return str(Path(run_dir) / "checkpoints" / "last.ckpt")


def stage_checkpoint(ctx, stage: str) -> str | None:
    """The checkpoint an earlier stage left in ``ctx.results[stage]["checkpoint"]``; None when there is none."""
    ckpt = ((getattr(ctx, "results", {}) or {}).get(stage, {}) or {}).get("checkpoint")
    return str(ckpt) if ckpt and Path(ckpt).exists() else None


def skipped_without(stage: str) -> dict:
    """The result of a stage that cannot run because ``stage`` left no checkpoint."""
    return {"summary": f"skipped: the {stage} stage left no checkpoint (run it first)", "outputs": []}


# ---------------------------------------------------------------------------------------------------------- probe
def get_probe(ctx):
    """The demo's trained probe (``ctx.results["probe"]["checkpoint"]``), loaded once; None when there is none."""
    ckpt = ((getattr(ctx, "results", {}) or {}).get("probe", {}) or {}).get("checkpoint")
    if not ckpt or not Path(ckpt).exists():
        return None
    if ckpt not in _PROBES:
        from vidgen.lightning_modules.probe import VideoProbe

        _PROBES[ckpt] = VideoProbe.load_probe(ckpt)
    return _PROBES[ckpt]


def probe_scores(probe, videos: torch.Tensor, labels=None, captions=None) -> tuple[dict, dict]:
    """(``{head: {"accuracy", "chance", "n"}}`` over heads with targets, ``{head: predictions}``)."""
    pred = probe.predict(videos.float())
    tgt = probe.targets(labels, captions)
    chance = probe.chance()
    scores = {}
    for k, y in tgt.items():
        m = y >= 0
        if m.any():
            scores[k] = {"accuracy": float((pred[k][m] == y[m]).float().mean()), "chance": chance[k],
                         "n": int(m.sum())}
    return scores, pred


def _names(probe, head: str) -> list[str]:
    cfg = probe.config
    if head == "class" and not cfg.class_of:
        return [str(i) for i in range(cfg.num_classes)]
    if head == "class":
        a, b = cfg.class_of
        return [f"{x} moving {y}" if b == "direction" else f"{x} {y}" for x in cfg.attributes[a]
                for y in cfg.attributes[b]]
    return list(cfg.attributes[head])


def format_probe(probe_res: dict) -> str:
    """One line: ``class 83% (real 100%, chance 8%), shape ...``."""
    parts = []
    for k, v in probe_res.items():
        ceil = v.get("ceiling")
        c = f"real {ceil * 100:.0f}%, " if ceil is not None else ""
        parts.append(f"{k} {v['accuracy'] * 100:.0f}% ({c}chance {v['chance'] * 100:.0f}%)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- the report
def _uint8(videos: torch.Tensor) -> np.ndarray:
    from vidgen.media import to_thwc_uint8

    return np.stack([to_thwc_uint8(v, layout="cthw") for v in videos.detach().float().clamp(-1, 1).cpu()])


def _captioned_grid(path: Path, frames: np.ndarray, texts: list[list[str]], cond: np.ndarray | None,
                    max_frames: int = 8) -> str:
    """PNG: per sample one row [text | (condition frames |) sample frames]."""
    from PIL import Image, ImageDraw, ImageFont

    n, t, h, w, _ = frames.shape
    pad = 2
    font = ImageFont.load_default()
    text_w = 8 + 6 * max((len(s) for rows in texts for s in rows), default=10)
    nf = min(t, max_frames)
    idx = np.linspace(0, t - 1, nf).round().astype(int)
    ncond = 0
    if cond is not None:
        ncond = min(cond.shape[1], max_frames)
        cidx = np.linspace(0, cond.shape[1] - 1, ncond).round().astype(int)
    row_h = max(h, 12 * len(texts[0]) if texts else 0) + pad
    width = text_w + (ncond + (1 if ncond else 0) + nf) * (w + pad) + pad
    img = Image.new("RGB", (width, n * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i in range(n):
        y = pad + i * row_h
        for j, line in enumerate(texts[i]):
            draw.text((4, y + 12 * j), line, fill=(0, 0, 0), font=font)
        x = text_w
        if ncond:
            for k in cidx:
                img.paste(Image.fromarray(cond[i, k]), (x, y))
                x += w + pad
            x += w + pad  # a gap between condition and sample
        for k in idx:
            img.paste(Image.fromarray(frames[i, k]), (x, y))
            x += w + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


def report_samples(ctx, stage: str, videos: torch.Tensor, *, labels=None, captions=None, cond=None,
                   label_role: str = "asked") -> dict:
    """Write ``samples.npz`` + a captioned grid for a generator stage, score them with the probe; see the module doc.

    ``videos``: ``[N, C, T, H, W]`` in [-1, 1]. ``labels``: the requested class per sample (int ``[N]``);
    ``captions``: the prompts (their attribute words are what the probe checks); ``cond``: the conditioning video
    ``[N, C, T', H', W']`` in [-1, 1] (frame prediction), or a dict of arrays saved as ``cond_<key>``.
    ``label_role``: how the grid names each label: ``asked`` (the class the sample was generated for) or e.g.
    ``true`` (the class of the clip a prediction continues, which the generator was not told)."""
    from vidgen.media import save_video_grid_mp4

    out = Path(ctx.out_dir) / stage
    out.mkdir(parents=True, exist_ok=True)
    if videos.ndim != 5:
        raise ValueError(f"report_samples expects videos [N, C, T, H, W] in [-1, 1], got {tuple(videos.shape)}")
    n = videos.shape[0]
    frames = _uint8(videos)
    arrays: dict[str, np.ndarray] = {"videos": frames}
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        arrays["labels"] = labels.numpy()
    if captions is not None:
        captions = [str(c) for c in captions]
        if len(captions) != n:
            raise ValueError(f"report_samples: {len(captions)} captions for {n} videos")
        arrays["captions"] = np.array(captions)
    cond_frames = None
    if isinstance(cond, torch.Tensor):
        cond_frames = _uint8(cond)
        arrays["cond_videos"] = cond_frames
    elif isinstance(cond, dict):
        for k, v in cond.items():
            arrays[f"cond_{k}"] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)

    probe = get_probe(ctx)
    res: dict = {"samples": str(out / "samples.npz")}
    pred = None
    if probe is not None and (labels is not None or captions is not None):
        scores, pred = probe_scores(probe, videos, labels, captions)
        ceiling = ((getattr(ctx, "results", {}) or {}).get("probe", {}) or {}).get("accuracy", {})
        for k, v in scores.items():
            v["ceiling"] = ceiling.get(k)
        res["probe"] = scores
        res["probe_summary"] = format_probe(scores)
        for k, p in pred.items():
            arrays[f"probe_{k}"] = p.numpy()
    np.savez_compressed(out / "samples.npz", **arrays)

    names = class_names(ctx)
    texts = []
    for i in range(n):
        rows = []
        if labels is not None:
            li = int(labels[i])
            rows.append(f"{label_role}: " + (names[li] if 0 <= li < len(names) else str(li)))
        if captions is not None:
            rows.append("asked: " + captions[i])
        if pred is not None:
            rows.append("probe: " + _names(probe, "class")[int(pred["class"][i])]
                        + ("" if captions is None else f", {_names(probe, 'colour')[int(pred['colour'][i])]}"
                           if "colour" in pred else ""))
        texts.append(rows or [f"sample {i}"])
    png = _captioned_grid(out / "samples.png", frames, texts, cond_frames)
    mp4 = save_video_grid_mp4(str(out / "samples.mp4"), videos.detach().float().cpu(), fps=8,
                              nrow=min(n, 8))
    res["outputs"] = [str(out / "samples.npz"), png, mp4]
    if "probe_summary" in res:
        ctx.log(f"probe on {n} samples: {res['probe_summary']}")
    return res


def load_samples(path: str | Path) -> dict:
    """``samples.npz`` back as ``{"videos": uint8 [N,T,H,W,3], "labels"?, "captions"? (list[str]), ...}``."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    if "captions" in d:
        d["captions"] = [str(c) for c in d["captions"]]
    return d


def samples_to_videos(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, T, H, W, 3]`` -> float ``[N, 3, T, H, W]`` in [-1, 1] (what models and metrics take)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.permute(0, 4, 1, 2, 3).contiguous()
