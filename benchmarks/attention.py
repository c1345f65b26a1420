"""Attention backends side by side: tokens/s of SDPA, the math reference and xformers (when installed).

    python benchmarks/attention.py                      # CPU, small shapes
    python benchmarks/attention.py --device cuda        # GPU, bf16, DiT/STDiT3-sized shapes
    python benchmarks/attention.py --causal --backward  # causal, forward + backward

Prints one row per shape with each backend's tokens/s, its ratio to SDPA and its max deviation from SDPA.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidgen.lightning_modules.nn.attention import attention, resolve_backend, xformers_available

CPU_SHAPES = [(4, 6, 64, 64), (2, 6, 256, 64), (1, 6, 1024, 64)]  # (B, heads, N, d)
CUDA_SHAPES = [(32, 16, 256, 72), (8, 16, 1024, 72), (2, 16, 4096, 72), (1, 16, 16384, 64)]


def bench(fn, iters: int, device: torch.device, min_time: float) -> float:
    """Seconds per call: a timed loop of at least ``min_time`` seconds after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(iters):
            fn()
        n += iters
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    p.add_argument("--shapes", default=None, help="B,H,N,d;B,H,N,d;... (default: a device-sized list)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
        if args.shapes
        else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    )
    backends = ["sdpa", "math"] + (["xformers"] if xformers_available() and device.type == "cuda" else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# attention backends on {name}, {dtype}, causal={args.causal}, backward={args.backward}")
    print(f"# xformers installed: {xformers_available()}; torch {torch.__version__}")
    header = f"{'B,H,N,d':>18} | " + " | ".join(f"{b:>32}" for b in backends)
    print(header)
    print("-" * len(header))
    for b, h, n, d in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(3))
        if args.backward:
            for t in (q, k, v):
                t.requires_grad_(True)
        ref = attention(q, k, v, causal=args.causal, backend="sdpa").detach().float()
        cells, base = [], None
        for backend in backends:
            if backend == "xformers" and resolve_backend(q, k, v, None, args.causal, "xformers") != "xformers":
                cells.append(f"{'unsupported':>32}")
                continue

            def run(backend=backend, q=q, k=k, v=v):
                out = attention(q, k, v, causal=args.causal, backend=backend)
                if args.backward:
                    out.float().sum().backward()
                return out

            try:
                dev = (run().detach().float() - ref).abs().max().item()
                sec = bench(run, args.iters, device, args.min_time)
            except torch.OutOfMemoryError:
                cells.append(f"{'OOM':>32}")
                torch.cuda.empty_cache()
                continue
            tps = b * n / sec
            base = tps if backend == "sdpa" else base
            ratio = tps / base if base else float("nan")
            cells.append(f"{tps:>9.3g} tok/s x{ratio:5.2f} dev {dev:7.1e}")
        print(f"{f'{b},{h},{n},{d}':>18} | " + " | ".join(cells))
    print("# xN = tokens/s relative to sdpa; dev = max |out - sdpa out|")


if __name__ == "__main__":
    main()
