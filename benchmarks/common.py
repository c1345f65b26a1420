"""Shared by the benchmark scripts: the GPU peaks behind MFU, the one-process-per-GPU distributed setup and the timed
training-step loop."""

from __future__ import annotations

import os
import sys

# bf16 dense tensor-core peaks (no sparsity), TFLOP/s
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "4090": 165.2}


def init_distributed(device_arg: str, port: int):
    """``(rank, world, device)`` after ``init_process_group`` (nccl on CUDA; ``device_arg="cpu"``: gloo smoke run).

    Works under torchrun and as a single plain process (rank 0 of 1)."""
    import torch
    import torch.distributed as dist

    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(port))):
        os.environ.setdefault(k, v)
    cuda = device_arg == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (use --device cpu for a gloo smoke run of the same code path)")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    return dist.get_rank(), dist.get_world_size(), device


def peak_tflops(device, override: float | None = None) -> tuple[str, float | None]:
    """(device name, its bf16 dense peak in TFLOP/s or None when unknown)."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name, override or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def timed_steps(step, warmup: int, steps: int, cuda: bool):
    """``(seconds per step, last loss, peak CUDA memory in GiB or nan)`` of ``step()`` after ``warmup`` calls."""
    import time

    import torch

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return dt, loss, (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
