"""FSDP2 bf16 smoke run of a real-size DiT block stack: peak memory and steps/s.

    python benchmarks/fsdp_smoke.py                       # 1 GPU: 28 DiT-XL blocks, hidden 1152, 16 heads, 4096 tokens
    python benchmarks/fsdp_smoke.py --no-ac               # without activation checkpointing
    python benchmarks/fsdp_smoke.py --fp32                # FSDP2 without the bf16 mixed-precision policy
    torchrun --nproc-per-node 8 benchmarks/fsdp_smoke.py  # sharded over 8 GPUs
    python benchmarks/fsdp_smoke.py --tiny                # CPU, tiny shapes (checks the code path)

Applies ``vidgen.parallel.apply_fsdp2`` exactly as ``FSDP2Strategy`` + ``configs/trainer/fsdp_bf16.yaml`` do
(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), activation checkpointing per block, bf16 autocast)
and trains with AdamW on random data. Prints one JSON line: parameters, peak allocated/reserved memory,
steps/s, tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidgen.lightning_modules.nn.attention import attention  # noqa: E402
from vidgen.parallel import apply_fsdp2, mixed_precision_policy  # noqa: E402


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = rearrange(self.ada(c), "b (six d) -> six b 1 d", six=6)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = x + g1 * self.proj(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class BlockStack(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, in_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.cond = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([DiTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(dim, in_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h, c = self.inp(x), self.cond(c)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.norm(h))


def _init_distributed(device: torch.device) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # single process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=4096, help="tokens per sample")
    p.add_argument("--batch", type=int, default=1, help="samples per GPU")
    p.add_argument("--in-dim", type=int, default=32, help="patch channels (e.g. 2x2x8 latent patch)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    p.add_argument("--fp32", action="store_true", help="no bf16 mixed-precision policy / autocast")
    args = p.parse_args(argv)
    if args.tiny:
        args.depth, args.dim, args.heads, args.seq, args.batch, args.steps, args.warmup = 4, 64, 4, 256, 2, 3, 1

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() and not args.tiny \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_distributed(device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    torch.manual_seed(0)
    with torch.device(device):
        model = BlockStack(args.depth, args.dim, args.heads, args.in_dim)
    n_params = sum(p.numel() for p in model.parameters())
    apply_fsdp2(model, (DiTBlock,), mesh, mp_policy=None if args.fp32 else mixed_precision_policy("bf16"),
                activation_checkpointing=not args.no_ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(args.batch, args.seq, args.in_dim, device=device)
    c = torch.randn(args.batch, args.dim, device=device)
    target = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)

    def step() -> float:
        with autocast:
            loss = F.mse_loss(model(x, c).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": dist.get_world_size(),
        "params_M": round(n_params / 1e6, 1),
        "depth": args.depth, "dim": args.dim, "heads": args.heads, "seq": args.seq, "batch": args.batch,
        "bf16": not args.fp32, "activation_checkpointing": not args.no_ac,
        "steps_per_s": round(args.steps / dt, 3),
        "tokens_per_s": round(args.steps * args.batch * args.seq / dt, 1),
        "peak_allocated_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "peak_reserved_GiB": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(loss, 4),
    }
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
