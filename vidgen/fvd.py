"""``vidgen fvd`` (= ``vidgen eval --metrics fvd``): FVD between real shards and generated videos (mp4 directory or
shards), reference I3D protocol.

    vidgen convert-i3d --out i3d_k400.pt                 # once: reference Kinetics-400 weights
    vidgen fvd --real data/ucf/train --fake samples/ --i3d i3d_k400.pt
    vidgen fvd --real 'data/ucf/train/shard-{000000..000099}.tar' --fake samples/ --num-samples 2048

Protocol (``vidgen.callbacks.fvd.FVD_*``): the first 16 frames of each clip, bilinear resize to 224 x 224 from [-1, 1],
400-d I3D logits, 2048 clips per side by default. ``--fake`` may be a ``samples.npz``. Real statistics are cached (keyed by the shard list, protocol,
network and sample count) under ``~/.cache/vidgen/fvd`` unless ``--real-stats``/``--no-cache`` say otherwise;
``--real`` may also be a statistics ``.npz`` made before.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict | None:
    """Parse ``vidgen fvd`` arguments, print the FVD line and return ``{"value", "n", "protocol"}`` (None: no --fake)."""
    from vidgen.callbacks.fvd import FVD_NUM_SAMPLES, FrechetVideoDistance
    from vidgen.lightning_modules.nn.i3d import load_i3d

    p = argparse.ArgumentParser(prog="vidgen fvd", description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, help="real shards (dir, brace pattern, glob) or a cached stats .npz")
    p.add_argument("--fake", help="generated videos: a directory of mp4/webm/... files, shards or a samples.npz")
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
    fake = check_fake(p, args.fake)
    metric = FrechetVideoDistance(load_i3d(args.i3d, map_location=args.device, kind=args.i3d_kind))
    return frechet(p, "FVD", metric, args.real, fake, args.num_samples, args.batch_size, args.device,
                   real_stats=args.real_stats, cache_dir=args.cache_dir, no_cache=args.no_cache)


def check_fake(p: argparse.ArgumentParser, fake: str | None):
    """``--fake`` checked before any work: None, a ``samples.npz`` path, or the expanded list of videos/shards."""
    from vidgen.callbacks.fvd import expand_sources

    if fake is None:
        return None
    if fake.endswith(".npz"):
        if not os.path.isfile(fake):
            p.error(f"--fake {fake}: no such samples.npz")
        return fake
    try:
        return expand_sources(fake)
    except FileNotFoundError as e:
        p.error(str(e))


def frechet(p: argparse.ArgumentParser, name: str, metric, real: str, fake, num_samples: int, batch_size: int,
            device: str, real_stats: str | None = None, cache_dir: str | None = None,
            no_cache: bool = False) -> dict | None:
    """A Fréchet metric (FVD, the frame FID) between ``real`` (shards or a statistics ``.npz`` of the metric's
    protocol) and ``fake`` (see :func:`check_fake`); prints ``<name> <value>``, returns ``{"value", "n",
    "protocol"}`` (None without ``fake``: real statistics only)."""
    from vidgen.callbacks.fvd import FeatureStats, _check_meta, accumulate_source, compute_real_stats, extractor_id
    from vidgen.callbacks.fvd import real_stats_path as keyed_path

    t0 = time.time()
    metric = metric.to(device)
    ext = extractor_id(metric.extractor)
    if real.endswith(".npz"):
        stats = FeatureStats.load(real)
        if stats.meta.get("protocol") != metric.protocol:
            p.error(f"{real} was made under protocol {stats.meta.get('protocol')!r}, not {metric.protocol!r}")
        _check_meta(stats, Path(real), None, ext, metric.protocol)
    else:
        cache = False if no_cache else real_stats or keyed_path(real, num_samples, ext, cache_dir, protocol=metric.protocol)
        stats = compute_real_stats(real, metric, num_samples, batch_size, device, cache=cache,
                                   log=lambda m: print(m, file=sys.stderr))
    print(f"{name} real: {stats.n // metric.rows_per_clip} clips", file=sys.stderr)
    if fake is None:
        print(f"{name}: no --fake given: real statistics only", file=sys.stderr)
        return None
    metric.set_real_stats(stats)
    counts = accumulate_source(metric, fake, False, num_samples, batch_size, device=device)
    if counts["used"] * metric.rows_per_clip < 2:
        p.error(f"{name}: only {counts['used']} usable generated clips in {fake} ({counts['skipped']} shorter than "
                f"{metric.num_frames} frames or undecodable)")
    if counts["used"] < num_samples:
        print(f"warning: {name} uses {counts['used']} generated clips, fewer than --num-samples {num_samples} "
              f"({counts['skipped']} skipped); the Fréchet distance is biased upwards with few samples",
              file=sys.stderr)
    value = float(metric.compute())
    print(f"{name} fake: {counts['used']} clips; {time.time() - t0:.1f}s; protocol: {metric.protocol}", file=sys.stderr)
    print(f"{name} {value:.4f}")
    return {"value": value, "n": counts["used"], "protocol": metric.protocol}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
