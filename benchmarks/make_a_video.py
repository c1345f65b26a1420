"""Pseudo-3D vs full-3D convolutions in the Make-A-Video U-Net (spec make_a_video_videopoet.md §1.3, Eq. 2: the
paper factorises space and time because full 3D layers cost too much): train steps/s, FLOPs and peak memory of the
same U-Net (same widths, same pseudo-3D attention) with ``conv_type='pseudo3d'`` against ``conv_type='full3d'``
(every 3x3 conv a 3x3x3 Conv3d) at 16 x 64^2 clips.

CPU (default): each variant in its own process (peak RSS is that variant's alone), fp32, AdamW, eps-MSE loss:

    python benchmarks/make_a_video.py                     # width 32 x (1, 2, 2), batch 1, 3 timed steps
    python benchmarks/make_a_video.py --width 64 --steps 5

GPU (``--gpu``): bf16 autocast on one GPU, peak memory from ``torch.cuda.max_memory_allocated``
(``--width 128 --batch 4`` is closer to a real decoder). Numbers measured on a shared machine are inflated by
contention; the ratio between the two variants, measured side by side, is what the script is for.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_variant(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion
    from vidgen.lightning_modules.nn.unet import UNet, UNetConfig

    device = "cuda" if args.gpu else "cpu"
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=args.width, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                     num_head_channels=32, groups=8, cond_dim=64, temporal=True, fps_cond=True,
                     conv_type=args.variant)
    net = UNet(cfg).to(device)
    diff = create_diffusion(DiffusionConfig(schedule="cosine", predict="eps", learn_sigma=False, loss="mse"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 3, args.frames, args.res, args.res, generator=g).to(device)
    kw = {"cond": torch.randn(args.batch, 64, generator=g).to(device), "fps": torch.full((args.batch,), 8.0, device=device)}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.gpu):
            loss = diff.training_losses(net, x0, kw)["loss"].mean()
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            net(x0, torch.zeros(args.batch, dtype=torch.long, device=device), **kw)
    fwd_flops = fc.get_total_flops()
    step()  # warm-up (allocator, kernels)
    if args.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": args.variant, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
            "fwd_GFLOP": fwd_flops / 1e9, "steps_per_s": args.steps / dt, "peak_MiB": peak,
            "peak_kind": "cuda max allocated" if args.gpu else f"max RSS (before timing {rss0 / 1024:.0f} MiB)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32, help="model_channels (channel_mult 1, 2, 2)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--variant", choices=["pseudo3d", "full3d"], help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return 0
    rows = []
    for variant in ("pseudo3d", "full3d"):
        cmd = [sys.executable, __file__, "--variant", variant, "--width", str(args.width), "--frames", str(args.frames),
               "--res", str(args.res), "--batch", str(args.batch), "--steps", str(args.steps)] + (["--gpu"] if args.gpu else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"U-Net width {args.width} x (1,2,2), clips {args.frames}x{args.res}^2, batch {args.batch}, "
          f"{'GPU bf16' if args.gpu else 'CPU fp32'}")
    print(f"{'variant':<10} {'params':>8} {'fwd GFLOP':>10} {'steps/s':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['variant']:<10} {r['params_M']:>7.2f}M {r['fwd_GFLOP']:>10.1f} {r['steps_per_s']:>8.3f} "
              f"{r['peak_MiB']:>9.0f}   ({r['peak_kind']})")
    a, b = rows
    print(f"full3d / pseudo3d: params x{b['params_M'] / a['params_M']:.2f}, FLOPs x{b['fwd_GFLOP'] / a['fwd_GFLOP']:.2f}, "
          f"step time x{a['steps_per_s'] / b['steps_per_s']:.2f}, peak memory x{b['peak_MiB'] / a['peak_MiB']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
