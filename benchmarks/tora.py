"""Tora's overhead on its STDiT3 base (issue 12 benchmark): train steps/s and peak memory, measured side by side.

CPU (default): STDiT3-S/2 on 4 x 5 x 16 x 16 latents (a 17-frame 128 px clip through the 4x/8x causal VAE),
batch 1, T5-width captions (4096 channels, 300 tokens, 120 of them real), fp32, AdamW, one rectified-flow step
(logit-normal t, v = x0 - eps). Every configuration in ``CONFIGS`` runs in its own process (so the peak RSS is its
own) and the table prints each one's ratio to the base:

    python benchmarks/tora.py                          # every registered configuration, 3 timed steps each
    python benchmarks/tora.py --configs stdit --size B/2 --frames 15 --steps 5

A configuration is ``name -> "module:factory"``; ``factory(args, device) -> (network, model_kwargs_fn)`` where
``model_kwargs_fn(x0)`` returns the network's kwargs for a latent batch. ``bench_stdit(model_factory, args)`` times
one configuration in the calling process; Tora's module registers its own factory (the "with Tora" column) by
adding to ``CONFIGS``.

GPU (``--gpu``): STDiT3-XL/2 under FSDP2 (``vidgen.parallel.apply_fsdp2``: bf16 parameters/compute, fp32 master
weights and gradient reduction) with activation checkpointing of every ``STDiT3Block``, bf16 autocast; steps/s, MFU
(model FLOPs = 3 x forward FLOPs over the bf16 dense peak) and peak memory. ``--device cpu`` runs the same code path on
gloo as a smoke test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import init_distributed, peak_tflops, timed_steps  # noqa: E402

#: configuration name -> "module:factory" (the first one is the base the others are compared with)
CONFIGS: dict[str, str] = {"stdit": "benchmarks.tora:stdit_factory", "tora": "benchmarks.tora:tora_factory",
                           "tora_adapt": "benchmarks.tora:tora_adapter_factory"}


def stdit_factory(args, device="cpu"):
    """The plain STDiT3 of ``args.size`` and random T5-shaped captions (``args.tokens`` tokens, 120 real)."""
    import torch

    from vidgen.lightning_modules.stdit import STDiT3, STDiT3Config

    cfg = STDiT3Config.from_size(args.size, caption_channels=args.caption_channels, model_max_length=args.tokens)
    with torch.device(device):
        net = STDiT3(cfg)

    def model_kwargs(x0):
        g = torch.Generator().manual_seed(1)
        b = x0.shape[0]
        y = torch.randn(b, args.tokens, args.caption_channels, generator=g).to(x0.device)
        mask = (torch.arange(args.tokens) < min(120, args.tokens)).expand(b, -1).to(x0.device)
        hw = torch.full((b,), float(x0.shape[-1] * 8), device=x0.device)
        return {"y": y, "mask": mask, "fps": torch.full((b,), 24.0, device=x0.device), "height": hw, "width": hw}

    return net, model_kwargs


def tora_factory(args, device="cpu", adapter: bool = False):
    """The same STDiT3 + Tora (trajectory extractor d' = 128, adaptive-norm fusers in the temporal blocks, §4.2-4.3);
    the motion latents are cached (the frozen motion VAE is not timed). ``adapter``: only temporal blocks + TE + MGF
    train (§4.4)."""
    import torch
    from torch import nn

    from vidgen.lightning_modules.tora import (
        TORA_TRAINABLE,
        FuserConfig,
        TrajectoryExtractor,
        TrajectoryExtractorConfig,
        build_fuser,
    )

    base, model_kwargs = stdit_factory(args, device)

    class ToraNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.config = base, base.config
            self.extractor = TrajectoryExtractor(TrajectoryExtractorConfig(in_channels=self.config.in_channels,
                                                                           levels=self.config.depth))
            for block in base.temporal_blocks:
                block.fuser = build_fuser(FuserConfig(), self.config.hidden_size, 128)

        def forward(self, x, t, motion_latent=None, **kw):
            return self.model(x, t, motion=tuple(self.extractor(motion_latent)), **kw)

    with torch.device(device):
        net = ToraNet()
    if adapter:
        import re

        pats = [re.compile(p) for p in TORA_TRAINABLE]
        for name, p in net.named_parameters():
            p.requires_grad_(any(pat.search(name) for pat in pats))

    def kwargs(x0):
        g = torch.Generator().manual_seed(2)
        return {**model_kwargs(x0), "motion_latent": torch.randn(x0.shape, generator=g).to(x0.device)}

    return net, kwargs


def tora_adapter_factory(args, device="cpu"):
    return tora_factory(args, device, adapter=True)


def _resolve(spec: str | Callable) -> Callable:
    if callable(spec):
        return spec
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def bench_stdit(model_factory: str | Callable, args, device: str = "cpu") -> dict:
    """Time ``args.steps`` rectified-flow training steps of the network ``model_factory(args, device)`` builds.

    Returns params (all / trainable, M), train FLOPs per step, the best step time, steps/s and peak memory (CPU: this
    process' max RSS, so run one configuration per process; CUDA: max allocated)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vidgen.lightning_modules.nn.diffusion import RectifiedFlow

    torch.manual_seed(0)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    net, kwargs_fn = _resolve(model_factory)(args, device)
    diffusion = RectifiedFlow(learn_sigma=getattr(getattr(net, "config", None), "pred_sigma", True))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, args.frames, args.latent, args.latent, generator=g).to(device)
    kwargs = kwargs_fn(x0)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, eps=1e-15)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = diffusion.training_losses(net, x0, kwargs)["loss"].mean()
        loss.backward()
        opt.step()
        return loss

    with FlopCounterMode(display=False) as fc:
        step()  # warm-up, counted
    train_flops = fc.get_total_flops()
    for _ in range(max(0, args.warmup - 1)):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
               else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024)
    return {"params_M": sum(p.numel() for p in net.parameters()) / 1e6, "trainable_M": sum(p.numel() for p in params) / 1e6,
            "train_GFLOPs": train_flops / 1e9, "step_s": min(times), "steps_per_s": 1.0 / min(times), "peak_MB": peak_mb}


def cpu_main(args) -> None:
    rows = []
    for name in args.configs:
        if name not in CONFIGS:
            sys.exit(f"unknown configuration {name!r}; registered: {sorted(CONFIGS)}")
        cmd = [sys.executable, __file__, "--child", name, "--size", args.size, "--frames", str(args.frames),
               "--latent", str(args.latent), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--tokens", str(args.tokens),
               "--caption-channels", str(args.caption_channels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append({"name": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(f"  {name}: {rows[-1]['steps_per_s']:.3f} steps/s", flush=True)
    base = rows[0]
    print(f"\nSTDiT3-{args.size}, latents 4x{args.frames}x{args.latent}x{args.latent}, batch {args.batch}, captions "
          f"{args.tokens}x{args.caption_channels}, fp32 CPU ({args.threads} threads), best of {args.steps} steps "
          "(timings on a shared machine are inflated by contention; compare the ratios)")
    head = (f"{'config':<10}{'params M':>9}{'trainable M':>12}{'train GFLOP':>12}{'x base':>7}{'steps/s':>9}"
            f"{'x base':>7}{'peak MB':>9}{'x base':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<10}{r['params_M']:>9.2f}{r['trainable_M']:>12.2f}{r['train_GFLOPs']:>12.1f}"
              f"{r['train_GFLOPs'] / base['train_GFLOPs']:>7.2f}{r['steps_per_s']:>9.3f}"
              f"{r['steps_per_s'] / base['steps_per_s']:>7.2f}{r['peak_MB']:>9.0f}"
              f"{r['peak_MB'] / max(base['peak_MB'], 1e-9):>7.2f}")


def gpu_main(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.flop_counter import FlopCounterMode

    from vidgen.lightning_modules.nn.diffusion import RectifiedFlow
    from vidgen.lightning_modules.stdit import STDiT
    from vidgen.parallel import apply_fsdp2, mixed_precision_policy

    rank, world, device = init_distributed(args.device, 29519)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    net, kwargs_fn = _resolve(CONFIGS[args.configs[0]])(args, device)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, args.frames, args.latent, args.latent, generator=g).to(device)
    kwargs = kwargs_fn(x0)
    diffusion = RectifiedFlow(learn_sigma=True)
    dtype = torch.bfloat16
    t = torch.full((args.batch,), 500.0, device=device)
    with torch.autocast(device.type, dtype=dtype), FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x0, t, **kwargs)
    model_flops = 3 * fc.get_total_flops()  # forward + backward (2x), no recomputation
    apply_fsdp2(net, STDiT.fsdp_block_classes, init_device_mesh(device.type, (world,)),
                mp_policy=mixed_precision_policy("bf16"), activation_checkpointing=True)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0, eps=1e-15)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = diffusion.training_losses(net, x0, kwargs)["loss"].mean()
        loss.backward()
        opt.step()
        return loss

    dt, loss, mem = timed_steps(step, args.warmup, args.steps, cuda)
    if rank == 0:
        name, peak = peak_tflops(device, args.peak_tflops)
        mfu = model_flops / dt / (peak * 1e12) if peak else float("nan")
        print(f"{args.configs[0]} STDiT3-{args.size}, {params / 1e6:.0f}M trainable params, latents "
              f"4x{args.frames}x{args.latent}^2, batch {args.batch}/GPU x {world} GPU(s), FSDP2 bf16 + activation "
              f"checkpointing, {name}")
        print(f"  {1 / dt:.3f} steps/s ({dt * 1000:.0f} ms/step), model {model_flops / 1e12:.2f} TFLOP/step/GPU, "
              f"MFU {mfu * 100:.1f}% (peak {peak} TFLOP/s), peak memory {mem:.1f} GiB, loss {float(loss.detach()):.4f}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="FSDP2 bf16 + activation checkpointing (default XL/2)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="--gpu only: cpu = gloo smoke run")
    p.add_argument("--configs", nargs="+", default=None, help=f"registered: {sorted(CONFIGS)} (default: all)")
    p.add_argument("--size", default=None, help="S/2 (CPU default) or XL/2 (GPU default); see STDIT3_MODELS")
    p.add_argument("--frames", type=int, default=None, help="latent frames (CPU 5 = 17 video frames; GPU 15 = 51)")
    p.add_argument("--latent", type=int, default=None, help="latent side (CPU 16 = 128 px; GPU 30 = 240 px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--caption-channels", type=int, default=4096)
    p.add_argument("--steps", type=int, default=None, help="timed steps (CPU 3, GPU 20)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or ("XL/2" if args.gpu else "S/2")
    args.frames = args.frames or (15 if args.gpu else 5)
    args.latent = args.latent or (30 if args.gpu else 16)
    args.steps = args.steps or (20 if args.gpu else 3)
    args.configs = args.configs or list(CONFIGS)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(bench_stdit(CONFIGS[args.child], args)))
    elif args.gpu:
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
