"""``vidgen fvd`` (= ``vidgen eval --metrics fvd``): FVD between real shards and generated videos (mp4 directory or
shards), reference I3D protocol.

    vidgen convert-i3d --out i3d_k400.pt                 # once: reference Kinetics-400 weights
    vidgen fvd --real data/ucf/train --fake samples/ --i3d i3d_k400.pt
    vidgen fvd --real 'data/ucf/train/shard-{000000..000099}.tar' --fake samples/ --num-samples 2048

Protocol (``vidgen.callbacks.fvd.FVD_*``): the first 16 frames of each clip, bilinear resize to 224 x 224 from [-1, 1],
400-d I3D logits, 2048 clips per side by default. Real statistics are cached (keyed by the shard list, protocol,
network and sample count) under ``~/.cache/vidgen/fvd`` unless ``--real-stats``/``--no-cache`` say otherwise;
``--real`` may also be a statistics ``.npz`` made before.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict | None:
    """Parse ``vidgen fvd`` arguments, print the FVD line and return ``{"value", "n", "protocol"}`` (None: no --fake)."""
    from vidgen.callbacks.fvd import (FVD_NUM_SAMPLES, FVD_PROTOCOL, FeatureStats, FrechetVideoDistance, accumulate_source,
                               compute_real_stats, expand_sources, extractor_id)
    from vidgen.lightning_modules.nn.i3d import load_i3d

    p = argparse.ArgumentParser(prog="vidgen fvd", description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, help="real shards (dir, brace pattern, glob) or a cached stats .npz")
    p.add_argument("--fake", help="generated videos: a directory of mp4/webm/... files, or shards")
    p.add_argument("--i3d", default="i3d_k400.pt", help="I3D weights: `vidgen convert-i3d` output or a local "
                   "StyleGAN-V i3d_torchscript.pt (default: %(default)s)")
    p.add_argument("--i3d-kind", default="auto", choices=("auto", "reference", "torchscript"))
    p.add_argument("--num-samples", type=int, default=FVD_NUM_SAMPLES, help="clips per side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real-stats", default=None, help="read/write real statistics at this path instead of the "
                   "keyed cache file")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: ~/.cache/vidgen/fvd)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached real statistics")
    args = p.parse_args(argv)
    if args.num_samples < 2 or args.batch_size < 1:
        p.error("--num-samples must be >= 2 and --batch-size >= 1")
    try:
        fake_paths = expand_sources(args.fake) if args.fake else None
    except FileNotFoundError as e:
        p.error(str(e))

    t0 = time.time()
    i3d = load_i3d(args.i3d, map_location=args.device, kind=args.i3d_kind)
    if args.real.endswith(".npz"):
        real = FeatureStats.load(args.real)
        if real.meta.get("protocol") != FVD_PROTOCOL:
            p.error(f"{args.real} was made under protocol {real.meta.get('protocol')!r}, not {FVD_PROTOCOL!r}")
    else:
        if args.no_cache:
            cache = False
        elif args.real_stats:
            cache = args.real_stats
        else:
            from vidgen.callbacks.fvd import real_stats_path

            cache = real_stats_path(args.real, args.num_samples, extractor_id(i3d), args.cache_dir)
        real = compute_real_stats(args.real, i3d, args.num_samples, args.batch_size, args.device, cache=cache,
                                  log=lambda m: print(m, file=sys.stderr))
    print(f"real: {real.n} clips", file=sys.stderr)
    if fake_paths is None:
        print("no --fake given: real statistics only", file=sys.stderr)
        return None
    metric = FrechetVideoDistance(i3d, real_stats=real).to(args.device)
    counts = accumulate_source(metric, fake_paths, False, args.num_samples, args.batch_size, device=args.device)
    if counts["used"] < 2:
        p.error(f"only {counts['used']} usable generated clips in {args.fake} ({counts['skipped']} shorter than "
                f"{metric.num_frames} frames or undecodable)")
    if counts["used"] < args.num_samples:
        print(f"warning: {counts['used']} generated clips, fewer than --num-samples {args.num_samples} "
              f"({counts['skipped']} skipped); FVD is biased upwards with few samples", file=sys.stderr)
    value = float(metric.compute())
    print(f"fake: {counts['used']} clips; {time.time() - t0:.1f}s; protocol: {FVD_PROTOCOL}", file=sys.stderr)
    print(f"FVD {value:.4f}")
    return {"value": value, "n": counts["used"], "protocol": FVD_PROTOCOL}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
