"""MAGVIT COMMIT decoding vs autoregressive decoding at the same size (spec magvit.md Part 3, §4.2 "60x faster").

Generates the token grid of one 16x128^2 clip (4x16x16 = 1024 tokens) with

- MAGVIT: 12 non-autoregressive steps of the bidirectional transformer (:meth:`MaskedVideoTransformer.sample_tokens`),
- AR: a causal transformer of the same size decoding one token per forward with the shared attention's KV cache,

and prints wall times and the speed ratio.  Token decoding only (the 3D-VQ decode is the same for both).
Weights are random: speed does not depend on them.

    python benchmarks/decode.py                       # B size, CPU, AR measured on all 1024 tokens
    python benchmarks/decode.py --device cuda --dtype bf16
    python benchmarks/decode.py --ar-tokens 128       # AR timed on 128 tokens, extrapolated (labelled as such)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vidgen.lightning_modules.magvit import MAGVIT_SIZES, BertConfig, BidirectionalTransformer, MaskedVideoTransformer  # noqa: E402
from vidgen.lightning_modules.nn.attention import KVCache  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def magvit_time(model: MaskedVideoTransformer, batch: int, repeats: int, device: torch.device) -> float:
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    model.sample_tokens("CG", batch, labels, generator=g)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model.sample_tokens("CG", batch, labels, generator=g)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def ar_decode(net: BidirectionalTransformer, prefix: torch.Tensor, num_tokens: int, codes: int,
              generator: torch.Generator) -> torch.Tensor:
    """One token per forward with per-layer KV caches (preallocated)."""
    cfg = net.cfg
    b = prefix.shape[0]
    dtype = next(net.parameters()).dtype
    caches = [KVCache.allocate(b, cfg.heads, prefix.shape[1] + num_tokens, cfg.hidden // cfg.heads, prefix.device, dtype)
              for _ in range(cfg.depth)]
    logits = net(prefix, logits_from=prefix.shape[1] - 1, vocab_limit=codes, kv_caches=caches)
    out = []
    pos = prefix.shape[1]
    for _ in range(num_tokens):
        probs = torch.softmax(logits[:, -1].float(), -1)
        tok = torch.multinomial(probs, 1, generator=generator)
        out.append(tok)
        logits = net(tok, vocab_limit=codes, kv_caches=caches, offset=pos)
        pos += 1
    return torch.cat(out, 1)


def ar_time(net: BidirectionalTransformer, batch: int, tokens: int, codes: int, device: torch.device) -> float:
    prefix = torch.full((batch, 1), codes, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    ar_decode(net, prefix, min(tokens, 8), codes, g)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    ar_decode(net, prefix, tokens, codes, g)
    _sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(MAGVIT_SIZES), default="B")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=list(_DTYPES), default="fp32")
    p.add_argument("--grid", type=int, nargs=3, default=[4, 16, 16], help="token grid t h w (16x128^2 -> 4 16 16)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ar-tokens", type=int, default=None,
                   help="AR tokens actually decoded (default: all); fewer are extrapolated linearly to the grid")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    dtype = _DTYPES[args.dtype]
    n = math.prod(args.grid)
    codes = 1024

    torch.manual_seed(0)
    model = MaskedVideoTransformer(size=args.size, tasks=["CG"], num_classes=101, codebook_size=codes,
                                   token_shape=list(args.grid), num_frames=16, resolution=128,
                                   decode_steps=args.steps).to(device=device, dtype=dtype).eval()
    bcfg = model.net.cfg
    ar_cfg = BertConfig(**{**bcfg.__dict__, "causal": True})
    ar = BidirectionalTransformer(ar_cfg).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.net.parameters()) / 1e6

    print(f"device {device} ({torch.get_num_threads()} CPU threads) dtype {args.dtype}; size {args.size} "
          f"({params:.1f}M params, depth {bcfg.depth}, hidden {bcfg.hidden}); {n} tokens {tuple(args.grid)}, "
          f"batch {args.batch}", flush=True)
    t_mg = magvit_time(model, args.batch, args.repeats, device)
    print(f"MAGVIT COMMIT decoding, {args.steps} steps x {n + 1}-token forward: {t_mg:.3f} s "
          f"({args.batch * 16 / t_mg:.1f} frames/s of 16-frame clips)", flush=True)
    k = n if args.ar_tokens is None else min(n, args.ar_tokens)
    t_k = ar_time(ar, args.batch, k, codes, device)
    if k == n:
        t_ar = t_k
        print(f"AR decoding with KV cache, {n} forwards of 1 token: {t_ar:.3f} s (measured)")
    else:
        t_ar = t_k * n / k
        print(f"AR decoding with KV cache: {k} tokens measured in {t_k:.3f} s -> {t_ar:.3f} s for {n} tokens "
              f"(EXTRAPOLATED linearly; attention over a longer cache makes the real number larger)")
    print(f"speed ratio AR / MAGVIT = {t_ar / t_mg:.1f}x  (paper: ~60x on accelerators; MAGVIT-B 37 fps on V100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
