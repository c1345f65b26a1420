"""Demo stage ``latte``: train a small class-conditional Latte (``configs/demo/latte.yaml``: variant 1, S-AdaLN,
DDPM with v-prediction and fixed variance (the recipes keep eps + learned sigma); spec latte_tora.md §1) on cached
latents of the demo's KL VAE, then sample ``per_class`` clips for each procedural class (DDIM + classifier-free
guidance, EMA weights) and score them with the probe (issue 10 §1: >= 70% classified as their class). Next to the
probe's accuracy on real val clips it reports the probe on the VAE's reconstructions of the procedural val clips
(same frames): the ceiling the samples can reach through this VAE.

Latents: the ``vae`` stage's checkpoint (a continuous tokenizer), its posterior means for every train clip encoded
once (``batch["latents"]``, the path ``vidgen tokenize`` shards feed); ``vae.scale_factor`` is set to 1/std of those
latents so the diffusion sees unit-variance data (Latte §4.1 uses SD's 0.18215 for the same purpose). Without a VAE
checkpoint the stage says so and stops. Writes ``<out>/latte/``: ``samples.{npz,png,mp4}``, ``loss.txt``,
``checkpoints/last.ckpt`` (the run layout of the CLI).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "latte.yaml"


def run(ctx) -> dict:
    import lightning as L
    import yaml

    from vidgen.callbacks.ema import EMA, ema_weights
    from vidgen.demos.common import (get_probe, last_checkpoint, load_clips, manifest, probe_scores, report_samples,
                                     skipped_without, stage_checkpoint, stage_trainer)
    from vidgen.lightning_modules.latte import Latte
    from vidgen.lightning_modules.video_tokenizer import latent_autoencoder

    out = Path(ctx.out_dir) / "latte"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = stage_checkpoint(ctx, "vae")
    if ckpt is None:
        return skipped_without("vae")
    cfg = yaml.safe_load(CONFIG.read_text())
    margs, dargs = dict(cfg["model"]["init_args"]), cfg["data"]["init_args"]
    steps = int(cfg["trainer"]["max_steps"]) // (4 if ctx.fast else 1)
    bs = int(dargs["batch_size"])
    T, R = int(margs["num_frames"]), int(margs["resolution"])
    L.seed_everything(ctx.seed, verbose=False)

    # cache the raw latents of every train clip once; unit variance through vae.scale_factor
    vae_cfg = {**margs.get("vae", {}), "kind": "tokenizer", "path": str(ckpt), "scale_factor": 1.0}
    vae = latent_autoencoder(vae_cfg)
    train = load_clips(ctx, "train", T, R, int(dargs.get("frame_stride", 1)))
    t0 = time.perf_counter()
    with torch.no_grad():
        lat = torch.cat([vae.encode(train["video"][i:i + 32]) for i in range(0, len(train["label"]), 32)])
    std = float(lat.std())
    margs["vae"] = {**vae_cfg, "scale_factor": round(1.0 / std, 5)}
    ctx.log(f"encoded {len(lat)} train clips to latents {tuple(lat.shape[1:])} in {time.perf_counter() - t0:.1f}s; "
            f"latent std {std:.3f} -> vae.scale_factor {1 / std:.4f}")
    model = Latte(**margs)
    c = model.config
    ctx.log(f"Latte V{c.variant}: {c.depth} blocks, d={c.hidden_size}, latents {c.num_frames}x{c.in_channels}x"
            f"{c.input_size}^2, {sum(p.numel() for p in model.model.parameters()) / 1e6:.2f}M parameters; {steps} "
            f"steps of batch {bs}")
    g = torch.Generator().manual_seed(ctx.seed)
    labels_all = train["label"]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                j = torch.randint(len(labels_all), (bs,), generator=g)
                yield {"latents": lat[j], "label": labels_all[j]}

    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    ema_args = next((dict(cb.get("init_args", {})) for cb in cfg["trainer"].get("callbacks", [])
                     if str(cb.get("class_path", "")).endswith("ema.EMA")), {"decay": 0.99})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is bound by per-op overhead: one thread is fastest (restored below)
    try:
        trainer = stage_trainer(out, max_steps=steps, callbacks=[EMA(**ema_args), Record()])
        t0 = time.perf_counter()
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(Stream(), batch_size=None))
        train_s = time.perf_counter() - t0
        k = max(1, min(50, len(losses) // 5))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        ctx.log(f"{len(losses)} steps in {train_s:.0f}s; loss {first:.3f} -> {last:.3f}; every 10%: "
                + ", ".join(f"{sum(losses[i:i + k]) / k:.3f}" for i in range(0, len(losses), max(1, len(losses) // 10))))
        (out / "loss.txt").write_text("\n".join(f"{i} {v:.5f}" for i, v in enumerate(losses)) + "\n")

        n_proc = int(manifest(ctx).get("procedural_classes", 12))
        per_class = 2 if ctx.fast else 4
        labels = torch.arange(n_proc).repeat_interleave(per_class)
        g = torch.Generator().manual_seed(ctx.seed)
        t0 = time.perf_counter()
        with torch.no_grad(), ema_weights(model):
            videos = torch.cat([model.generate({"label": labels[i:i + 24]}, generator=g)
                                for i in range(0, len(labels), 24)])
        sample_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    ctx.log(f"sampled {len(labels)} clips ({model.sampler} {model.sample_steps} steps, CFG {model.cfg_scale}, EMA "
            f"weights) in {sample_s:.0f}s")
    rep = report_samples(ctx, "latte", videos, labels=labels)
    acc = rep.get("probe", {}).get("class", {}).get("accuracy")
    ceiling = None  # the probe on VAE reconstructions of the procedural val clips: what the samples can reach
    probe = get_probe(ctx)
    if probe is not None:
        val = load_clips(ctx, "val", T, R, int(dargs.get("frame_stride", 1)), procedural_only=True)
        with torch.no_grad():
            rec = torch.cat([vae.decode(vae.encode(val["video"][i:i + 32])).clamp(-1, 1)
                             for i in range(0, len(val["label"]), 32)])
        ceiling = {k: v["accuracy"] for k, v in probe_scores(probe, rec, val["label"])[0].items()}
        ctx.log(f"probe on VAE reconstructions of {len(val['label'])} procedural val clips (the samples' ceiling): "
                + ", ".join(f"{k} {v * 100:.0f}%" for k, v in ceiling.items()))
    return {
        "summary": f"{len(losses)} steps in {train_s:.0f}s, loss {first:.3f} -> {last:.3f}; probe class accuracy "
                   + (f"{acc * 100:.0f}%" if acc is not None else "n/a (no probe)") + f" on {len(labels)} samples"
                   + (f" (on VAE reconstructions of val clips: {ceiling['class'] * 100:.0f}%)" if ceiling else ""),
        "steps": len(losses), "loss_first": first, "loss_last": last, "checkpoint": last_checkpoint(out),
        "probe": rep.get("probe"), "probe_vae_reconstructions": ceiling,
        "metrics": {"class_accuracy": acc, "latent_scale_factor": 1 / std,
                    "class_accuracy_vae_reconstructions": ceiling and ceiling.get("class")},
        "samples": rep["samples"], "outputs": rep["outputs"] + [str(out / "loss.txt")],
    }
