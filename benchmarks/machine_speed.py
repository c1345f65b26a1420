"""How fast this machine runs the demo's work, to put ``make demo`` wall times from different machines side by side.

The demo's stages are compute-bound tiny models on one torch thread each, so their CPU-seconds scale with the speed of
a few kernels. This times, on one thread, the training step of the demo's two largest consumers at their demo shapes:

- ``tokenizer_2d``: the MAGVIT 2D-VQ recipe (``configs/magvit/tokenizer_2d_tiny.yaml``), batch 16 of 32^2 frames;
- ``tokenizer_3d``: the 3D-VQ recipe (``configs/magvit/tokenizer_ucf101_tiny.yaml``), batch 16 of 4 x 32^2 windows;
- ``transformer``: the demo MAGVIT transformer's shape (3 blocks of width 96, 258 tokens, batch 16) as plain
  ``nn.TransformerEncoder`` blocks;
- ``matmul``: one 512^3 fp32 matmul (GFLOP/s).

Each number is the median of ``--repeats`` timed runs; the units are ms per step (GFLOP/s for matmul). A demo timed on
another machine compares by the ratio of these figures, e.g. ``tokenizer_3d`` 1207 ms here vs 690 ms there means the
same demo needs ~1.75x the CPU-seconds here. Measured values go in the README next to the demo's wall time.

    python benchmarks/machine_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(step, warmup: int = 2, n: int = 5) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def tokenizer_step(config: str, frames: int, batch: int = 16):
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    cfg = yaml.safe_load((ROOT / config).read_text())
    args = dict(cfg["model"]["init_args"])
    args.update(num_frames=frames, resolution=32)
    m = VideoTokenizer(**args)
    bs = batch  # fixed (not the recipe's, which may change): figures stay comparable across sessions
    x = torch.rand(bs, 3, frames, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    opt = torch.optim.AdamW(m.parameters(), 1e-4)

    def step():
        q = m.quantizer(m.encoder(x), step=100)
        loss = torch.nn.functional.mse_loss(m.decoder(q.latents), x) + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def transformer_step():
    layer = torch.nn.TransformerEncoderLayer(96, 4, 384, dropout=0.0, batch_first=True, norm_first=True)
    net = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    x = torch.randn(16, 258, 96)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)

    def step():
        loss = net(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    a_ = torch.randn(512, 512)
    b_ = torch.randn(512, 512)
    cases = {
        "tokenizer_2d": tokenizer_step("configs/magvit/tokenizer_2d_tiny.yaml", 1),
        "tokenizer_3d": tokenizer_step("configs/magvit/tokenizer_ucf101_tiny.yaml", 4),
        "transformer": transformer_step(),
        "matmul": lambda: a_ @ b_,
    }
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} cores")
    for name, step in cases.items():
        runs = [_timed(step, n=20 if name == "matmul" else 5) for _ in range(a.repeats)]
        med = statistics.median(runs)
        if name == "matmul":
            print(f"{name:<14} {2 * 512 ** 3 / med / 1e9:8.1f} GFLOP/s")
        else:
            print(f"{name:<14} {med * 1000:8.1f} ms/step  (min {min(runs) * 1000:.1f}, max {max(runs) * 1000:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
