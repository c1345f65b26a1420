"""Demo stage ``tokenizer``: train the tiny MAGVIT 3D-VQ tokenizer (``configs/magvit/tokenizer_ucf101_tiny.yaml``:
8x32^2 -> 4x8x8 tokens, 256 codes, EMA; GAN + LeCam for the second half) on the demo train shards, then reconstruct validation clips
with the EMA weights and write input|reconstruction side by side (mp4 + PNG).

Returns PSNR, SSIM, codebook usage/perplexity and ``checkpoint`` (a Lightning checkpoint that
``VideoTokenizer.load_frozen`` reads), which the MAGVIT and Latte stages pick up from ``ctx.results["tokenizer"]``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "magvit" / "tokenizer_ucf101_tiny.yaml"
VAE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "latte" / "vae_tiny.yaml"


def run(ctx) -> dict:
    """The tiny MAGVIT 3D-VQ tokenizer (tokens for the MAGVIT stage)."""
    return train_and_report(ctx, CONFIG, "tokenizer", "tiny MAGVIT 3D-VQ")


def run_vae(ctx) -> dict:
    """The tiny per-frame KL autoencoder of ``configs/latte/vae_tiny.yaml`` (latents for the Latte stage)."""
    return train_and_report(ctx, VAE_CONFIG, "vae", "tiny KL VAE (Latte)")


def train_and_report(ctx, config: Path, subdir: str, title: str) -> dict:
    import lightning as L
    import yaml
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    from vidgen.callbacks.ema import EMA
    from vidgen.runtime import run_layout
    from vidgen.datamodules import VideoDataModule
    from vidgen.lightning_modules.nn.quantizers import CodebookUsage
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer
    from vidgen.datamodules.media import save_video_grid_mp4, write_grid_png

    out = Path(ctx.out_dir) / subdir
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(config.read_text())
    model_args, data_args = cfg["model"]["init_args"], cfg["data"]["init_args"]
    T, R = int(data_args["num_frames"]), int(data_args["resolution"])
    batches = 40 if ctx.fast else 150
    model_args["optim"] = {**model_args.get("optim", {}), "total_steps": batches}
    model_args["discriminator"] = {**model_args.get("discriminator", {}), "start_step": batches // 2}
    L.seed_everything(ctx.seed, verbose=False)
    model = VideoTokenizer(**model_args, num_frames=T, resolution=R)
    dm = VideoDataModule(train_shards=str(Path(ctx.data_dir) / "train"), val_shards=str(Path(ctx.data_dir) / "val"),
                         seed=ctx.seed, num_frames=T, resolution=R, batch_size=int(data_args.get("batch_size", 4)),
                         num_workers=1, crop="center")
    grid = (f"tokens {model.token_shape(T, R, R)}, {model.codebook_size} codes" if model.codebook_size
            else f"latents {model.latent_shape(T, R, R)}")
    ctx.log(f"{title}: {T}x{R}^2 -> {grid}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params (G + D); {batches} batches")
    trainer = L.Trainer(max_steps=batches + (batches - batches // 2),  # G steps + D steps
                        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, **run_layout(str(out), [EMA(decay=0.99, warmup_steps=batches)]))
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    dt = time.perf_counter() - t0
    m = trainer.callback_metrics
    ctx.log(f"trained {model.train_steps} batches in {dt:.0f}s ({model.train_steps / dt:.2f} batches/s); last "
            f"L2 {float(m.get('train/rec_l2', float('nan'))):.4f}, D loss {float(m.get('train/loss_d', float('nan'))):.3f}")
    ckpt = out / f"{subdir}_tiny.ckpt"
    trainer.save_checkpoint(str(ckpt), weights_only=False)

    tok = VideoTokenizer.load_frozen(str(ckpt))  # EMA weights, eval mode
    usage = CodebookUsage(tok.codebook_size) if tok.codebook_size else None
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    dm.setup("validate")
    reals, recs, psnrs = [], [], []
    for i, batch in enumerate(dm.val_dataloader()):
        if i == 4:
            break
        batch = dm.finish_batch(batch)
        video = batch["video"]
        tokens = tok.encode(video)
        rec = tok.decode(tokens).clamp(-1, 1)
        if usage is not None:
            usage.update(tokens)
        mse = ((rec - video) ** 2).flatten(1).mean(1) / 4.0  # [0, 1] pixels
        psnrs.append(-10 * torch.log10(mse.clamp_min(1e-10)))
        ssim.update(*(((v + 1) / 2).transpose(1, 2).flatten(0, 1) for v in (rec, video)))
        reals.append(video)
        recs.append(rec)
    psnr = float(torch.cat(psnrs).mean())
    u = usage.compute() if usage is not None else None
    real, rec = torch.cat(reals)[:8], torch.cat(recs)[:8]
    pairs = torch.cat([real, rec], dim=-1)  # input | reconstruction
    mp4 = save_video_grid_mp4(str(out / "reconstructions.mp4"), pairs, fps=8, nrow=2)
    png = write_grid_png(str(out / "reconstructions.png"), pairs, max_frames=T)
    codes = (f", codebook usage {float(u['usage']) * 100:.0f}% (perplexity {float(u['perplexity']):.0f})"
             if u is not None else "")
    res = {
        "summary": f"PSNR {psnr:.2f} dB, SSIM {float(ssim.compute()):.3f}{codes} on "
                   f"{len(torch.cat(reals))} val clips; {model.train_steps} batches in {dt:.0f}s",
        "psnr": psnr, "ssim": float(ssim.compute()), "checkpoint": str(ckpt), "outputs": [mp4, png, str(ckpt)],
    }
    if u is not None:
        res.update(codebook_usage=float(u["usage"]), perplexity=float(u["perplexity"]))
    ctx.log(res["summary"])
    return res
