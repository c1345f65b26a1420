"""Demo stages ``tokenizer`` and ``vae``: train the tiny MAGVIT 3D-VQ tokenizer
(``configs/magvit/tokenizer_ucf101_tiny.yaml``: 8x32^2 -> 4x8x8 tokens; inflated, as MAGVIT §3.1 does, from the
per-frame 2D-VQ of ``configs/magvit/tokenizer_2d_tiny.yaml`` that the stage trains first) and the tiny per-frame KL VAE
(``configs/latte/vae_tiny.yaml``: 8x32^2 -> 8x4x8x8 latents) on the demo train clips, then reconstruct the held-out
val clips with the EMA weights.

Each recipe's model and ``trainer.max_steps`` are used as written (``--fast`` divides the steps by 4); the clips are
decoded once and kept in memory. Reports PSNR on procedural val clips (the issue-10 target) and on real footage
separately, SSIM, codebook usage, the PSNR curve (``psnr_curve.txt``) and ``checkpoint`` (a Lightning checkpoint
``VideoTokenizer.load_frozen`` reads), which the MAGVIT and Latte stages pick up from ``ctx.results``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "magvit" / "tokenizer_ucf101_tiny.yaml"
CONFIG_2D = Path(__file__).resolve().parents[2] / "configs" / "magvit" / "tokenizer_2d_tiny.yaml"
VAE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "latte" / "vae_tiny.yaml"


def run(ctx) -> dict:
    """The tiny MAGVIT 3D-VQ tokenizer (tokens for the MAGVIT stage): the per-frame 2D-VQ first, then the 3D-VQ
    centrally inflated from its EMA weights (MAGVIT §3.1) and trained on clips."""
    image = train_and_report(ctx, CONFIG_2D, "tokenizer/image_2d", "tiny MAGVIT 2D-VQ (per frame, to inflate)",
                             report=False)
    res = train_and_report(ctx, CONFIG, "tokenizer", "tiny MAGVIT 3D-VQ", init_from_2d=image["checkpoint"])
    res["image_2d"] = {k: image[k] for k in ("checkpoint", "psnr_curve", "seconds", "steps")}
    if Path(res.get("checkpoint") or "").is_file():  # every clip's codes once, for the token-space stages after this one
        from vidgen.demos.common import save_clip_tokens
        from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

        t0 = time.perf_counter()
        res["tokens"] = save_clip_tokens(ctx, VideoTokenizer.load_frozen(res["checkpoint"]),
                                         Path(ctx.out_dir) / "tokenizer" / "tokens.pt")
        ctx.log(f"tokenised every train/val clip once for the later stages ({res['tokens']}) in "
                f"{time.perf_counter() - t0:.0f}s")
    res["summary"] += (f"; inflated from a 2D-VQ trained {image['steps']} batches ({image['seconds']:.0f}s, "
                       f"{image['psnr_curve'][-1][2]:.1f} dB raw)")
    return res


def run_vae(ctx) -> dict:
    """The tiny per-frame KL autoencoder of ``configs/latte/vae_tiny.yaml`` (latents for the Latte stage)."""
    return train_and_report(ctx, VAE_CONFIG, "vae", "tiny KL VAE (Latte)")


def psnr_per_clip(rec: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per clip of [-1, 1] videos, measured on [0, 1] pixels."""
    mse = ((rec.clamp(-1, 1) - video) ** 2).flatten(1).mean(1) / 4.0
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(tok, video: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    return torch.cat([tok.decode(tok.encode(video[i:i + batch_size])).clamp(-1, 1)
                      for i in range(0, video.shape[0], batch_size)])


def train_and_report(ctx, config: Path, subdir: str, title: str, init_from_2d: str | None = None,
                     report: bool = True) -> dict:
    """Train ``config``'s model on the demo clips (``init_from_2d``: inflate that 2D checkpoint first, §1.11) and,
    with ``report``, reconstruct the val clips with the EMA weights and write the pictures."""
    import lightning as L
    import yaml
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    from vidgen.callbacks.ema import EMA
    from vidgen.demos.common import CLIP_FRAMES, last_checkpoint, load_clips, manifest, stage_trainer
    from vidgen.lightning_modules.nn.quantizers import CodebookUsage
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer
    from vidgen.datamodules.media import save_video_grid_mp4, write_grid_png

    out = Path(ctx.out_dir) / subdir
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(config.read_text())
    model_args, data_args = cfg["model"]["init_args"], cfg["data"]["init_args"]
    T, R = int(data_args["num_frames"]), int(data_args["resolution"])
    steps = int(cfg["trainer"]["max_steps"]) // (4 if ctx.fast else 1)
    if ctx.fast:
        model_args["optim"] = {**model_args.get("optim", {}), "total_steps": steps}
    bs = int(data_args.get("batch_size", 4))
    L.seed_everything(ctx.seed, verbose=False)
    if init_from_2d:
        model_args["init_from_2d"] = init_from_2d
    model = VideoTokenizer(**model_args, num_frames=T, resolution=R)
    if model.discriminator is not None and model.dcfg.start_step < steps:
        ctx.log(f"note: the GAN starts at batch {model.dcfg.start_step}; Lightning counts G and D steps")
    # the clips are decoded once at the 3D recipe's length; a recipe with fewer frames (the per-frame 2D phase at
    # num_frames 1) trains on a random window of each, as the datamodule's random clip offset gives it in `vidgen fit`
    clip_frames = max(T, CLIP_FRAMES)
    train = load_clips(ctx, "train", clip_frames, R)
    val = load_clips(ctx, "val", clip_frames, R)
    n_proc = int(manifest(ctx).get("procedural_classes", 12))
    proc = (val["label"] >= 0) & (val["label"] < n_proc)
    grid = (f"tokens {model.token_shape(T, R, R)}, {model.codebook_size} codes" if model.codebook_size
            else f"latents {model.latent_shape(T, R, R)}")
    ctx.log(f"{title}: {T}x{R}^2 -> {grid}, {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k params; "
            f"{steps} steps of batch {bs} on {len(train['label'])} clips ({config.name})")

    curve: list[tuple[int, float, float]] = []
    every = max(1, steps // 6)

    class Curve(L.Callback):
        """PSNR of the raw weights on procedural val clips every ``every`` batches (the learning curve)."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = pl_module.train_steps
            if s % every == 0 or s == steps:
                pl_module.eval()
                p = float(psnr_per_clip(reconstruct(pl_module, val["video"][proc][:16]), val["video"][proc][:16]).mean())
                pl_module.train()
                curve.append((s, time.perf_counter() - t0, p))
                ctx.log(f"batch {s}: val PSNR {p:.2f} dB (raw weights), {time.perf_counter() - t0:.0f}s")

    g = torch.Generator().manual_seed(ctx.seed)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                j = torch.randint(len(train["label"]), (bs,), generator=g)
                yield {"video": random_windows(train["video"][j], T, g), "label": train["label"][j],
                       "key": [""] * bs, "text": [""] * bs}

    trainer = stage_trainer(out, max_steps=steps, callbacks=[EMA(**(_ema_args(cfg) or {"decay": 0.99})), Curve()])
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(Stream(), batch_size=None))
    dt = time.perf_counter() - t0
    ckpt = last_checkpoint(out)
    (out / "psnr_curve.txt").write_text("# batch seconds psnr_db (raw weights, 16 procedural val clips)\n"
                                        + "".join(f"{s} {t:.1f} {p:.2f}\n" for s, t, p in curve))
    ctx.log("PSNR curve (batch: dB): " + ", ".join(f"{s}: {p:.1f}" for s, _, p in curve))
    if not report:
        return {"checkpoint": str(ckpt), "psnr_curve": curve, "seconds": dt, "steps": model.train_steps}

    tok = VideoTokenizer.load_frozen(str(ckpt))  # EMA weights, eval mode
    video = val["video"]
    rec = reconstruct(tok, video)
    psnr = psnr_per_clip(rec, video)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    ssim.update(*(((v[proc] + 1) / 2).transpose(1, 2).flatten(0, 1) for v in (rec, video)))
    u = None
    if tok.codebook_size:
        usage = CodebookUsage(tok.codebook_size)
        usage.update(tok.encode(video))
        u = usage.compute()
    p_proc = float(psnr[proc].mean())
    p_real = float(psnr[~proc].mean()) if (~proc).any() else float("nan")
    show = torch.cat([torch.nonzero(proc).flatten()[:6], torch.nonzero(~proc).flatten()[:2]])
    pairs = torch.cat([video[show], rec[show]], dim=-1)  # input | reconstruction
    mp4 = save_video_grid_mp4(str(out / "reconstructions.mp4"), pairs, fps=8, nrow=2)
    png = write_grid_png(str(out / "reconstructions.png"), pairs, max_frames=clip_frames)
    codes = (f", codebook usage {float(u['usage']) * 100:.0f}% (perplexity {float(u['perplexity']):.0f})"
             if u is not None else "")
    res = {
        "summary": f"PSNR {p_proc:.2f} dB on {int(proc.sum())} procedural val clips (real footage {p_real:.2f} dB, "
                   f"{int((~proc).sum())} clips), SSIM {float(ssim.compute()):.3f}{codes}; {model.train_steps} "
                   f"batches in {dt:.0f}s",
        "psnr": p_proc, "psnr_real": p_real, "ssim": float(ssim.compute()), "psnr_curve": curve,
        "metrics": {"psnr_procedural_db": round(p_proc, 2), "psnr_real_db": round(p_real, 2)},
        "checkpoint": str(ckpt), "outputs": [png, mp4, str(out / "psnr_curve.txt"), str(ckpt)],
    }
    if u is not None:
        res.update(codebook_usage=float(u["usage"]), perplexity=float(u["perplexity"]))
    ctx.log(res["summary"])
    return res


def random_windows(video: torch.Tensor, num_frames: int, generator: torch.Generator) -> torch.Tensor:
    """A window of ``num_frames`` consecutive frames at a random offset of each clip of ``video`` [B, C, T, H, W]
    (the clips themselves when ``num_frames`` is their length)."""
    t = video.shape[2]
    if num_frames >= t:
        return video
    start = torch.randint(t - num_frames + 1, (video.shape[0],), generator=generator)
    return torch.stack([v[:, s:s + num_frames] for v, s in zip(video, start.tolist())])


def _ema_args(cfg: dict) -> dict | None:
    for cb in (cfg.get("trainer", {}) or {}).get("callbacks", []) or []:
        if str(cb.get("class_path", "")).endswith("ema.EMA"):
            return dict(cb.get("init_args", {}))
    return None
