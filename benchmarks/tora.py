"""Tora's overhead over its base (spec latte_tora.md §4): train steps/s and peak memory of STDiT3-S/2 without and
with the Tora modules (trajectory extractor + adaptive-norm fusers in the temporal blocks) at the same size, measured
side by side on the same inputs. Tora trains only temporal blocks + TE + MGF (§4.4); both are also timed with every
parameter trainable. The motion VAE runs without gradients and is left out (cached motion latents), as the text
encoder is (random caption states).

    PYTHONPATH=$PWD python benchmarks/tora.py                  # CPU: 1 x 4 x 5 x 16 x 16 latents
    PYTHONPATH=$PWD python benchmarks/tora.py --device cuda --frames 15 --size 32 --batch 4 --bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from vidgen.lightning_modules.stdit import STDiT3, STDiT3Config
from vidgen.lightning_modules.tora import FuserConfig, TrajectoryExtractor, TrajectoryExtractorConfig, build_fuser


def build(tora: bool, args) -> tuple[nn.ModuleDict, list[nn.Parameter]]:
    torch.manual_seed(0)
    cfg = STDiT3Config.from_size(args.model, caption_channels=args.caption_dim, model_max_length=args.tokens)
    net = STDiT3(cfg)
    mods = nn.ModuleDict({"model": net})
    if tora:
        mods["extractor"] = TrajectoryExtractor(TrajectoryExtractorConfig(in_channels=4, channels=128, levels=cfg.depth))
        for block in net.temporal_blocks:
            block.fuser = build_fuser(FuserConfig(), cfg.hidden_size, 128)
    if args.adapter and tora:
        for name, p in mods.named_parameters():
            p.requires_grad_(name.startswith(("model.temporal_blocks.", "extractor.")) or ".fuser." in name)
    return mods, [p for p in mods.parameters() if p.requires_grad]


def measure(tora: bool, args) -> tuple[float, float, int]:
    dev = torch.device(args.device)
    mods, params = build(tora, args)
    mods.to(dev).train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    b, t, s = args.batch, args.frames, args.size
    x = torch.randn(b, 4, t, s, s, device=dev)
    y = torch.randn(b, args.tokens, args.caption_dim, device=dev)
    motion_latent = torch.randn(b, 4, t, s, s, device=dev)
    timestep = torch.rand(b, device=dev) * 1000
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            kw = {"motion": tuple(mods["extractor"](motion_latent))} if tora else {}
            out = mods["model"](x, timestep, y, **kw)
            loss = out[:, :4].float().square().mean()
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    rate = args.steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
    return rate, peak, sum(p.numel() for p in params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="S/2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=5, help="latent frames")
    p.add_argument("--size", type=int, default=16, help="latent side")
    p.add_argument("--tokens", type=int, default=16, help="caption tokens")
    p.add_argument("--caption-dim", type=int, default=384)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    rows = []
    for adapter in (False, True):
        args.adapter = adapter
        for tora in (False, True):
            if adapter and not tora:
                continue
            rate, peak, n = measure(tora, args)
            rows.append((("Tora, adapter (§4.4)" if adapter else "Tora, all trainable") if tora else "STDiT3 base",
                         rate, peak, n))
    base = rows[0][1]
    print(f"STDiT3-{args.model}, latents {args.batch}x4x{args.frames}x{args.size}^2 on {args.device}"
          f"{' bf16' if args.bf16 else ''}")
    print(f"{'model':<24} {'steps/s':>8} {'vs base':>8} {'peak MiB':>9} {'trainable':>10}")
    for name, rate, peak, n in rows:
        print(f"{name:<24} {rate:8.2f} {rate / base:8.2f} {peak:9.0f} {n / 1e6:9.1f}M")


if __name__ == "__main__":
    main()
