"""Demo stage ``latte``: train a tiny class-conditional Latte (V1, S-AdaLN, DDPM + learned sigma) on latents of the
demo clips, then sample one clip per class with DDPM (100 steps) and classifier-free guidance (spec latte_tora.md §1).

Latents: the tokenizer stage's checkpoint when it is a continuous (KL / plain AE) tokenizer; otherwise (a VQ/LFQ
tokenizer, or none) a labelled pixel-space stand-in: 32x32 frames average-pooled 2x ("pixels", not a VAE). The clips are
encoded once and training reads them as cached latents (``batch["latents"]``), the path ``vidgen tokenize`` shards
feed. Writes to ``<out>/latte/``: ``samples.{png,mp4}`` (one row per class), ``real.png``, ``loss.txt`` and
``latte_tiny.ckpt``. Training runs for a fixed time budget (90 s, 15 s with --fast) on one thread: expect blurry
coloured blobs moving, not clean shapes (about 2000 steps start to show them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

CLASSES_SHOWN = 8  # square and circle, moving left/right/up/down


def _vae_config(ctx) -> tuple[dict, int, int, str]:
    """(vae config, num_frames, resolution, description): the demo tokenizer when it has continuous latents."""
    results = getattr(ctx, "results", {}) or {}
    for stage in ("vae", "tokenizer"):  # the KL VAE stage first; the tokenizer stage is VQ in the default demo
        ckpt = (results.get(stage, {}) or {}).get("checkpoint")
        if ckpt and Path(ckpt).exists():
            break
    if ckpt and Path(ckpt).exists():
        from vidgen.lightning_modules.video_tokenizer import latent_autoencoder

        try:
            vae = latent_autoencoder({"kind": "tokenizer", "path": str(ckpt)})
        except ValueError as e:  # a VQ / LFQ tokenizer: discrete codes
            ctx.log(f"tokenizer checkpoint not usable for latent diffusion ({str(e).split(':')[0]})")
        else:
            tok = vae.model
            frames = int(getattr(tok, "num_frames", 8))
            return ({"kind": "tokenizer", "path": str(ckpt)}, frames, int(getattr(tok, "resolution", 64)),
                    f"KL tokenizer latents {vae.latent_shape(frames, tok.resolution, tok.resolution)} from {ckpt}")
    return ({"kind": "pixels", "factor": 2}, 8, 32,
            "PIXEL STAND-IN (32x32 frames average-pooled 2x to 3x16x16; no KL tokenizer checkpoint available)")


def _cached_latent_batches(model, dm, n_batches: int) -> tuple[list[dict], torch.Tensor]:
    batches, real = [], None
    it = iter(dm.train_dataloader())
    for _ in range(n_batches):
        try:
            b = next(it)
        except StopIteration:
            break
        with torch.no_grad():
            z = model.vae.encode(b["video"]) / model.vae.scale_factor  # raw latents, as `vidgen tokenize` stores
        batches.append({"latents": z, "label": b["label"]})
        real = b["video"] if real is None else real
    return batches, real


def run(ctx) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from vidgen.callbacks.ema import EMA, ema_weights
    from vidgen.runtime import run_layout
    from vidgen.datamodules import VideoDataModule
    from vidgen.lightning_modules.latte import Latte
    from vidgen.datamodules.media import save_video_grid_mp4, write_grid_png

    out = Path(ctx.out_dir) / "latte"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(ctx.seed)
    manifest = json.loads((Path(ctx.data_dir) / "manifest.json").read_text())
    num_classes = int(manifest.get("num_classes", 14))
    vae, frames, resolution, what = _vae_config(ctx)
    ctx.log(f"latents: {what}")

    patch = 4 if vae["kind"] == "pixels" else 2  # 16x16 stand-in latents: 4x4 patches keep 16 tokens per frame
    model = Latte(size="S", patch_size=patch, depth=4, hidden_size=96, num_heads=4, variant=1, condition="class",
                  num_classes=num_classes, class_dropout_prob=0.1, num_frames=frames, resolution=resolution, vae=vae,
                  lr=2e-3, grad_clip_norm=1.0, sampler="ddpm", sample_steps=100, cfg_scale=3.0)
    cfg = model.config
    ctx.log(f"Latte V1: {cfg.depth} blocks, d={cfg.hidden_size}, latents {cfg.num_frames}x{cfg.in_channels}x"
            f"{cfg.input_size}^2, {sum(p.numel() for p in model.model.parameters()) / 1e6:.2f}M parameters")
    # flip=False: a mirrored clip would contradict its "moving left/right" label
    dm = VideoDataModule(train_shards=str(Path(ctx.data_dir) / "train"), seed=ctx.seed, num_frames=frames,
                         frame_stride=2, resolution=resolution, crop="center", flip=False, batch_size=8, num_workers=0)
    dm.setup("fit")
    t0 = time.perf_counter()
    batches, real = _cached_latent_batches(model, dm, 6 if ctx.fast else 16)
    ctx.log(f"encoded {sum(len(b['label']) for b in batches)} clips once in {time.perf_counter() - t0:.1f}s")

    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    budget = 15 if ctx.fast else 90  # seconds of training (about 600-900 steps on a free CPU core)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is bound by per-op overhead: one thread is fastest (restored below)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=150 if ctx.fast else 1500,
                        max_time={"seconds": budget}, enable_progress_bar=False, enable_model_summary=False,
                        **run_layout(str(out), [EMA(decay=0.99), Record()]))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True)
    t0 = time.perf_counter()
    try:
        trainer.fit(model, train_dataloaders=loader)
        train_s = time.perf_counter() - t0
        steps = len(losses)
        k = max(1, min(20, steps // 4))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        ctx.log(f"{steps} steps in {train_s:.0f}s ({steps / train_s:.1f} steps/s); loss {first:.3f} -> {last:.3f} "
                f"(mean of the first/last {k})")
        (out / "loss.txt").write_text("\n".join(f"{i} {v:.5f}" for i, v in enumerate(losses)) + "\n")
        trainer.save_checkpoint(str(out / "latte_tiny.ckpt"), weights_only=False)

        shown = min(CLASSES_SHOWN, num_classes)
        g = torch.Generator().manual_seed(ctx.seed)
        t0 = time.perf_counter()
        with ema_weights(model):
            videos = model.generate({"label": torch.arange(shown)}, generator=g)
    finally:
        torch.set_num_threads(threads)
    ctx.log(f"sampled {shown} clips (DDPM 100, CFG 3.0, EMA weights) in {time.perf_counter() - t0:.1f}s; rows = "
            + ", ".join(manifest.get("classes", [str(i) for i in range(num_classes)])[:shown]))
    write_grid_png(str(out / "samples.png"), videos, max_frames=frames)
    save_video_grid_mp4(str(out / "samples.mp4"), videos, fps=4, nrow=4)
    write_grid_png(str(out / "real.png"), real[:shown], max_frames=frames)
    stand_in = vae["kind"] == "pixels"
    return {
        "summary": f"{steps} steps, loss {first:.3f} -> {last:.3f}; {shown} class-conditional samples"
                   + (" [pixel stand-in latents]" if stand_in else " [KL tokenizer latents]"),
        "steps": steps, "loss_first": first, "loss_last": last, "latents": what,
        "checkpoint": str(out / "latte_tiny.ckpt"),
        "outputs": [str(out / "samples.png"), str(out / "samples.mp4"), str(out / "real.png"), str(out / "loss.txt")],
    }
