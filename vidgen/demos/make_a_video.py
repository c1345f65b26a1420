"""Demo stage ``make_a_video``: text-to-video with NO text-video pairs in training (Make-A-Video, spec
make_a_video_videopoet.md §1.1-§1.5), on the procedural clips ("a red square moving left").

1. A tiny CLIP (open_clip ``CLIP`` + ``ClipLoss``, ``lightning_modules/clip.py``) on (frame, caption) pairs; its
   zero-shot caption->frame retrieval accuracy on val is reported.
2. The prior P on (frame, caption) pairs: CLIP text encodings -> CLIP image embedding (DALL-E 2 diffusion prior).
3. The decoder D on single frames, conditioned on the frame's own CLIP image embedding (no text).
4. D^t: temporal layers added at identity, D's weights loaded, fine-tuned on 8-frame clips WITHOUT their captions,
   conditioned on the CLIP embedding of the first frame and on fps (per-clip fps drawn from a Beta distribution in
   [4, 8] with the datamodule's own ``target_fps`` / ``clip_indices`` on the cached 15-frame clips).
5. Sampling: caption -> CLIP text -> P -> y_e -> D^t (fps 4, CFG on both) -> 8 frames at 32x32, scored by the
   demo's probe (``report_samples``): shape and colour are what a CLIP image embedding carries; direction cannot
   pass through an image embedding of one frame, which is the paper's own stated limitation (§1.1 notes), and its
   accuracy is reported as that measure.

Each training phase runs for a fixed time budget (about 80 s in all; a fifth with --fast) on cached tensors, so the
stage fits its share of ``make demo`` on 2 cores; the models are tiny and the samples rough.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

NUM_FRAMES, RES, SRC_FRAMES = 8, 32, 15
BUDGET = {"clip": 12, "prior": 8, "image": 25, "video": 30}  # seconds of training per phase
UNET = dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,), num_head_channels=32,
            groups=8, num_cond_tokens=2)
PROMPTS = [  # every shape x direction, colours cycling: labels for the probe, captions for colour
    ("red", "square", "left"), ("green", "square", "right"), ("blue", "square", "up"), ("yellow", "square", "down"),
    ("green", "circle", "left"), ("blue", "circle", "right"), ("yellow", "circle", "up"), ("red", "circle", "down"),
    ("blue", "triangle", "left"), ("yellow", "triangle", "right"), ("red", "triangle", "up"), ("green", "triangle", "down"),
]


def _fit(module, batches, seconds: float, max_steps: int, ema: bool = False):
    """Train a LightningModule on in-memory batches for a time budget; (losses, seconds, trainer)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from vidgen.callbacks.ema import EMA

    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    cbs = [Record()] + ([EMA(decay=0.99)] if ema else [])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_time={"seconds": seconds},
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=cbs, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
    return losses, time.perf_counter() - t0, trainer


def _loss_line(losses: list[float]) -> str:
    k = max(1, min(20, len(losses) // 4))
    return f"{len(losses)} steps, loss {np.mean(losses[:k]):.3f} -> {np.mean(losses[-k:]):.3f}"


def _fps_clips(clips: torch.Tensor, rng: np.random.Generator, src_fps: float = 8.0):
    """(clips, fps, index of their first frame): 8-frame clips at a per-clip target fps drawn from Beta(1, 1) on
    [4, 8] through the datamodule's draw (``decode.target_fps``) and frame spacing (``decode.clip_indices``)."""
    from vidgen.datamodules.decode import ClipSpec, clip_indices, target_fps

    spec = ClipSpec(num_frames=NUM_FRAMES, fps_range=(4.0, 8.0), fps_beta=(1.0, 1.0))
    out, fps, first = [], [], []
    for v in clips:
        f = target_fps(spec, rng)
        idx = clip_indices(v.shape[1], NUM_FRAMES, src_fps / f, float(rng.random()), "loop")
        out.append(v[:, torch.from_numpy(idx)])
        fps.append(f)
        first.append(int(idx[0]))
    return torch.stack(out), torch.tensor(fps, dtype=torch.float32), torch.tensor(first)


def run(ctx) -> dict:
    from vidgen.demos.common import load_clips, report_samples
    from vidgen.lightning_modules.clip import CLIP, CLIP_SIZES, retrieval_accuracy
    from vidgen.lightning_modules.make_a_video import DiffusionPrior, MakeAVideoDecoder

    out = Path(ctx.out_dir) / "make_a_video"
    out.mkdir(parents=True, exist_ok=True)
    scale = 0.2 if ctx.fast else 1.0
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: per-op overhead dominates, one thread is fastest (restored below)
    try:
        train = load_clips(ctx, "train", SRC_FRAMES, RES, 1, procedural_only=True)
        val = load_clips(ctx, "val", SRC_FRAMES, RES, 1, procedural_only=True)
        clips, texts = train["video"], train["text"]
        n, t_src = clips.shape[0], clips.shape[2]
        ctx.log(f"{n} procedural train clips ({t_src} frames, {RES}x{RES}); captions used only for CLIP and the prior")

        # 1. tiny CLIP on (frame, caption) pairs --------------------------------------------------------------------
        clip = CLIP(model_cfg=CLIP_SIZES["tiny"], lr=2e-3, weight_decay=0.05, warmup_steps=20)
        batches = []
        for _ in range(400):
            i = torch.randint(0, n, (64,), generator=g)
            f = torch.randint(0, t_src, (64,), generator=g)
            batches.append({"video": clips[i, :, f], "text": [texts[j] for j in i.tolist()]})
        losses, secs, tr = _fit(clip, batches, BUDGET["clip"] * scale, len(batches))
        ckpt_clip = str(out / "clip_tiny.ckpt")
        tr.save_checkpoint(ckpt_clip, weights_only=False)
        clip.eval()
        with torch.no_grad():
            mid = val["video"][:, :, t_src // 2]
            img, txt, _ = clip.features(mid, val["text"])
        acc, chance = retrieval_accuracy(txt, img, val["text"])
        ctx.log(f"CLIP: {_loss_line(losses)} in {secs:.0f}s; zero-shot caption->frame retrieval on val "
                f"{acc:.0%} (chance {chance:.0%}, {len(val['text'])} clips)")
        clip_cfg = {"checkpoint": ckpt_clip}

        # CLIP features, computed once: image embeddings of every train frame, text conditions of every caption
        prior = DiffusionPrior(clip=clip_cfg, dim=64, depth=2, heads=2, max_text_len=12, steps=1000,
                               sample_steps=32, cfg_scale=2.0, lr=1e-3, weight_decay=0.0)
        C = prior.clip
        with torch.no_grad():
            flat = clips.permute(0, 2, 1, 3, 4).reshape(n * t_src, 3, RES, RES)
            frame_emb = torch.cat([C.encode_image(flat[k:k + 256]) for k in range(0, len(flat), 256)])
            frame_emb = frame_emb.reshape(n, t_src, -1)
            uniq = sorted(set(texts))
            tc = prior.text_conditions(uniq)
        cap_idx = torch.tensor([uniq.index(s) for s in texts])

        # 2. prior P on (frame, caption) pairs ----------------------------------------------------------------------
        batches = []
        for _ in range(2000):
            i = torch.randint(0, n, (64,), generator=g)
            f = torch.randint(0, t_src, (64,), generator=g)
            c = cap_idx[i]
            batches.append({"image_embed": frame_emb[i, f], "text_embed": tc["text_embed"][c],
                            "text_tokens": tc["text_tokens"][c], "text_mask": tc["text_mask"][c]})
        losses, secs, tr = _fit(prior, batches, BUDGET["prior"] * scale, len(batches), ema=True)
        ckpt_prior = str(out / "prior_tiny.ckpt")
        tr.save_checkpoint(ckpt_prior, weights_only=False)
        ctx.log(f"prior: {_loss_line(losses)} in {secs:.0f}s")

        # 3. decoder D on single frames (y_e = the frame's own CLIP embedding) -----------------------------------------
        dec = MakeAVideoDecoder(stage="image", unet=UNET, clip=clip_cfg, num_frames=1, resolution=RES, lr=2e-3,
                                cond_drop_prob=0.1)
        batches = []
        for _ in range(3000):
            i = torch.randint(0, n, (24,), generator=g)
            f = torch.randint(0, t_src, (24,), generator=g)
            batches.append({"video": clips[i, :, f], "image_embed": frame_emb[i, f]})
        losses, secs, tr = _fit(dec, batches, BUDGET["image"] * scale, len(batches), ema=True)
        ckpt_d = str(out / "decoder_image_tiny.ckpt")
        tr.save_checkpoint(ckpt_d, weights_only=False)
        ctx.log(f"D (image stage): {_loss_line(losses)} in {secs:.0f}s, "
                f"{sum(p.numel() for p in dec.unet.parameters()) / 1e6:.2f}M parameters")

        # 4. D^t: temporal layers at identity, D loaded, clips without captions, y_e of the first frame, fps -------------
        dect = MakeAVideoDecoder(stage="video", unet=UNET, clip=clip_cfg, num_frames=NUM_FRAMES, resolution=RES,
                                 lr=2e-3, cond_drop_prob=0.1, init_from=ckpt_d, spatial_lr_scale=0.5,
                                 prior=ckpt_prior, prior_cfg_scale=2.0, cfg_scale=3.0, sample_steps=20, sample_fps=4.0)
        batches = []
        for _ in range(600):
            i = torch.randint(0, n, (4,), generator=g)
            v, fps, first = _fps_clips(clips[i], rng)
            batches.append({"video": v, "image_embed": frame_emb[i, first], "fps": fps})  # y_e of frame 0 of the clip
        losses, secs, tr = _fit(dect, batches, BUDGET["video"] * scale, len(batches), ema=True)
        tr.save_checkpoint(str(out / "decoder_video_tiny.ckpt"), weights_only=False)
        new = sum(p.numel() for _, p in dect.unet.new_video_parameters())
        ctx.log(f"D^t (video stage, no captions): {_loss_line(losses)} in {secs:.0f}s; "
                f"{new / 1e6:.2f}M new temporal/fps parameters, spatial lr x0.5")

        # 5. text -> P -> y_e -> D^t ---------------------------------------------------------------------------------
        from vidgen.callbacks.ema import ema_weights

        captions = [f"a {c} {s} moving {d}" for c, s, d in PROMPTS]
        from vidgen.demo_data import class_label

        labels = torch.tensor([class_label(s, d) for _, s, d in PROMPTS])
        t0 = time.perf_counter()
        with ema_weights(dect):
            videos = dect.generate({"text": captions, "fps": torch.full((len(captions),), 4.0)},
                                   generator=torch.Generator().manual_seed(ctx.seed))
        ctx.log(f"sampled {len(captions)} clips (prior DDIM 32 CFG 2 -> D^t DDIM 20 CFG 3, fps 4, EMA weights) "
                f"in {time.perf_counter() - t0:.1f}s")
    finally:
        torch.set_num_threads(threads)
    rep = report_samples(ctx, "make_a_video", videos, labels=labels, captions=captions)
    res = {"summary": f"CLIP retrieval {acc:.0%} (chance {chance:.0%}); text->video with no text-video pairs: "
                      + rep.get("probe_summary", "no probe"),
           "clip_retrieval_acc": acc, "clip_retrieval_chance": chance, "checkpoint": str(out / "decoder_video_tiny.ckpt")}
    res.update({k: v for k, v in rep.items() if k != "outputs"})
    res["outputs"] = rep.get("outputs", [])
    return res
