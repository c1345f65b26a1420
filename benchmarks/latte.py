"""Latte variants at equal size: FLOPs, train steps/s and peak memory (spec latte_tora.md §1.3: V4 has the lowest FLOPs).

CPU (default): Latte-S/2, 16 x 4 x 32 x 32 latents (256 px clips), class-conditional, batch 1, fp32, AdamW, the
L_simple + L_vlb loss. Each variant runs in its own process, so the peak RSS is that variant's alone:

    python benchmarks/latte.py                       # all four variants, 3 timed steps each
    python benchmarks/latte.py --size B/2 --steps 5 --variants 1 4

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, SDPA) for one forward and for
one forward + backward. Block counts: V1/V2 ``depth`` blocks, V3/V4 ``depth/2`` (see lightning_modules/latte.py).

GPU (``--gpu``): Latte-XL/2 under FSDP2 (``vidgen.parallel.apply_fsdp2``: bf16 parameters/compute, fp32 master weights
and gradient reduction) with activation checkpointing of every block, bf16 autocast; reports steps/s, MFU (model
FLOPs = 3 x forward FLOPs, no recomputation, over the bf16 dense peak of the GPU) and peak memory:

    python benchmarks/latte.py --gpu                                  # one GPU
    torchrun --nproc_per_node 8 benchmarks/latte.py --gpu --batch 5   # per-GPU batch 5, as the official recipe
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import init_distributed, peak_tflops, timed_steps  # noqa: E402


def build(args, variant: int, device="cpu"):
    import torch

    from vidgen.lightning_modules.latte import LatteConfig, LatteTransformer
    from vidgen.lightning_modules.nn.diffusion import create_diffusion

    cfg = LatteConfig.from_size(args.size, variant=variant, num_frames=args.frames, input_size=args.latent,
                                in_channels=4, condition="class", num_classes=101)
    with torch.device(device):
        net = LatteTransformer(cfg)
    return net, create_diffusion(channel_dim=2)


def inputs(args, device):
    import torch

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, args.frames, 4, args.latent, args.latent, generator=g).to(device)
    y = torch.randint(0, 101, (args.batch,), generator=g).to(device)
    return x0, y


def count_flops(net, diffusion, x0, y, backward: bool) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.full((x0.shape[0],), 500, dtype=torch.long, device=x0.device)
    with FlopCounterMode(display=False) as fc:
        if backward:
            diffusion.training_losses(net, x0, {"y": y}, t=t)["loss"].mean().backward()
        else:
            with torch.no_grad():
                net(x0, t, y=y)
    net.zero_grad(set_to_none=True)
    return fc.get_total_flops()


# ----------------------------------------------------------------------------------------------------------------------
# CPU: one variant per process
# ----------------------------------------------------------------------------------------------------------------------
def cpu_child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    net, diffusion = build(args, args.variant)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    x0, y = inputs(args, "cpu")
    fwd = count_flops(net, diffusion, x0, y, backward=False)
    train = count_flops(net, diffusion, x0, y, backward=True)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        diffusion.training_losses(net, x0, {"y": y})["loss"].mean().backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "params_M": params / 1e6, "fwd_GFLOPs": fwd / 1e9, "train_GFLOPs": train / 1e9,
            "step_s": min(times), "steps_per_s": 1.0 / min(times), "peak_rss_MB": peak_kb / 1024,
            "peak_above_base_MB": (peak_kb - base_kb) / 1024}


def cpu_main(args) -> None:
    rows = []
    for v in args.variants:
        cmd = [sys.executable, __file__, "--child", "--variant", str(v), "--size", args.size, "--frames", str(args.frames),
               "--latent", str(args.latent), "--batch", str(args.batch), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"variant {v} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  V{v}: {r['train_GFLOPs']:.0f} GFLOP/step, {r['steps_per_s']:.3f} steps/s", flush=True)
    v1 = rows[0]
    print(f"\nLatte-{args.size}, latents {args.frames}x4x{args.latent}x{args.latent}, batch {args.batch}, fp32 CPU "
          f"({args.threads} threads), best of {args.steps} steps")
    head = f"{'variant':<8}{'params M':>9}{'fwd GFLOP':>11}{'train GFLOP':>13}{'x V1':>6}{'steps/s':>9}{'x V1':>6}" \
           f"{'peak RSS MB':>13}{'above base':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"V{r['variant']:<7}{r['params_M']:>9.2f}{r['fwd_GFLOPs']:>11.1f}{r['train_GFLOPs']:>13.1f}"
              f"{r['train_GFLOPs'] / v1['train_GFLOPs']:>6.2f}{r['steps_per_s']:>9.3f}"
              f"{r['steps_per_s'] / v1['steps_per_s']:>6.2f}{r['peak_rss_MB']:>13.0f}{r['peak_above_base_MB']:>12.0f}")
    lowest = min(rows, key=lambda r: r["train_GFLOPs"])["variant"]
    print(f"\nlowest FLOPs: V{lowest} (paper: V4)")


# ----------------------------------------------------------------------------------------------------------------------
# GPU: FSDP2 + activation checkpointing, bf16
# ----------------------------------------------------------------------------------------------------------------------
def gpu_main(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vidgen.lightning_modules.latte import Latte
    from vidgen.parallel import apply_fsdp2, mixed_precision_policy

    rank, world, device = init_distributed(args.device, 29517)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    net, diffusion = build(args, args.variant, device)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    x0, y = inputs(args, device)
    dtype = torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        fwd = count_flops(net, diffusion, x0, y, backward=False)  # unsharded, no recomputation
    model_flops = 3 * fwd  # forward + backward (2x) per step and GPU
    apply_fsdp2(net, Latte.fsdp_block_classes, init_device_mesh(device.type, (world,)),
                mp_policy=mixed_precision_policy("bf16"), activation_checkpointing=True)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = diffusion.training_losses(net, x0, {"y": y})["loss"].mean()
        loss.backward()
        opt.step()
        return loss

    dt, loss, mem = timed_steps(step, args.warmup, args.steps, cuda)
    if rank == 0:
        name, peak = peak_tflops(device, args.peak_tflops)
        mfu = model_flops / dt / (peak * 1e12) if peak else float("nan")
        print(f"Latte-{args.size} V{args.variant}, {params / 1e6:.0f}M params, latents {args.frames}x4x{args.latent}^2, "
              f"batch {args.batch}/GPU x {world} GPU(s), FSDP2 bf16 + activation checkpointing, {name}")
        print(f"  {1 / dt:.3f} steps/s ({dt * 1000:.0f} ms/step), {args.batch * world / dt:.1f} clips/s, "
              f"model {model_flops / 1e12:.2f} TFLOP/step/GPU, MFU {mfu * 100:.1f}% (peak {peak} TFLOP/s), "
              f"peak memory {mem:.1f} GiB, loss {float(loss.detach()):.4f}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="FSDP2 bf16 + activation checkpointing path (default XL/2)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="--gpu only: cpu = gloo smoke run")
    p.add_argument("--size", default=None, help="S/2 (CPU default) or XL/2 (GPU default); any of S|B|L|XL / 2|4|8")
    p.add_argument("--variants", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--variant", type=int, default=1, help="--gpu / --child: the variant to run")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="CPU default 1, GPU default 5 (per GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (CPU 3, GPU 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 peak")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or ("XL/2" if args.gpu else "S/2")
    args.batch = args.batch or (5 if args.gpu else 1)
    args.steps = args.steps or (20 if args.gpu else 3)
    if args.child:
        print(json.dumps(cpu_child(args)))
    elif args.gpu:
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
