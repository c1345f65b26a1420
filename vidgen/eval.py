"""``vidgen eval``: the papers' metrics on generated videos, with pinned protocols (issue 10 §3; README "Evaluation").

    vidgen eval --metrics fvd --real data/ucf/train --fake samples/ --i3d i3d_k400.pt
    vidgen eval --metrics is --fake samples/ --c3d c3d_ucf101.pt                   # StyleGAN-V TorchScript
    vidgen eval --metrics is --fake samples/ --c3d conv3d_deepnetA_ucf.npz --c3d-mean mean2.npz   # TGAN2 Chainer
    vidgen eval --metrics clipsim --fake samples.npz --clip-arch ViT-B-32 --clip-checkpoint open_clip_b32.bin
    vidgen eval --metrics accuracy --fake outputs/demo/latte/samples.npz --probe outputs/demo/probe/checkpoints/last.ckpt
    vidgen eval --metrics fid --real data/ucf/train --fake samples/ --inception pt_inception-2015-12-05-6726825d.pth
    vidgen eval --metrics trajerror --fake runs/tora/predictions/samples.npz        # Tora: needs `trajectories`

``--fake``: a ``samples.npz`` (what every demo stage and the prediction writer save: ``videos`` uint8
``[N, T, H, W, 3]`` plus ``labels`` / ``captions`` / ``trajectories``), a directory of video files, or shards
(captions from ``.txt``, labels from ``.cls``). ``vidgen fvd`` is ``vidgen eval --metrics fvd``. TrajError reads the
requested trajectories from the ``samples.npz`` (``trajectories`` float ``[N, K, T, 2]`` pixel (x, y) per frame, NaN
rows for absent objects, as Tora's ``predict_step`` returns them and the prediction writer stores them; the demo's
``report_samples`` stores them as ``cond_trajectories``, also read).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

METRICS = ("fvd", "is", "clipsim", "fid", "accuracy", "trajerror")


def iter_fake(spec: str, num_frames: int | None, limit: int | None
              ) -> Iterator[tuple[int, np.ndarray | None, int, str, np.ndarray | None]]:
    """``(index, uint8 [T, H, W, 3] or None, label (-1: none), caption ("" : none), trajectories [K, T, 2] or None)``
    for the first ``limit`` clips (trajectories only from a ``samples.npz`` that has them)."""
    if spec.endswith(".npz"):
        from vidgen.demos.common import load_samples

        d = load_samples(spec)
        vids = d["videos"]
        labels = d.get("labels", np.full(len(vids), -1))
        caps = d.get("captions", [""] * len(vids))
        trajs = d.get("trajectories", d.get("cond_trajectories"))  # prediction writer / demo report_samples
        for i in range(len(vids) if limit is None else min(limit, len(vids))):
            v = vids[i]
            yield (i, (v if num_frames is None or v.shape[0] >= num_frames else None), int(labels[i]), caps[i],
                   None if trajs is None else trajs[i])
        return
    from vidgen.callbacks.fvd import _decode_first_frames, expand_sources
    from vidgen.datamodules import tario
    from vidgen.datamodules.tario import VIDEO_EXTS

    i = 0
    for path in expand_sources(spec):
        if path.endswith(".tar"):
            items = ((s.get(next((e for e in VIDEO_EXTS if e in s), ""), None), s) for _, s in tario.iter_stream(path))
        else:
            items = iter([(open(path, "rb").read(), {})])
        for data, sample in items:
            if data is None:
                continue
            if limit is not None and i >= limit:
                return
            try:
                frames = _decode_first_frames(data, num_frames) if num_frames else _decode_all(data)
            except Exception:  # noqa: BLE001 - counted as skipped by the caller
                frames = None
            label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
            cap = sample["txt"].decode() if "txt" in sample else ""
            yield i, frames, label, cap, None
            i += 1


def _decode_all(data: bytes) -> np.ndarray:
    """Every frame of an encoded video, uint8 ``[T, H, W, 3]`` (the metrics without a frame protocol see the whole
    clip, as they do from a samples.npz)."""
    from vidgen.datamodules.media import FrameReader

    reader = FrameReader(data)
    return reader.get(list(range(reader.num_frames)))


def _video(frames: np.ndarray) -> torch.Tensor:
    from vidgen.demos.common import samples_to_videos

    return samples_to_videos(frames[None])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidgen eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", default="fvd", help=f"comma-separated, from {','.join(METRICS)} (default: fvd)")
    p.add_argument("--real", help="real shards / stats .npz (FVD)")
    p.add_argument("--fake", help="generated videos: samples.npz, a video directory or shards")
    p.add_argument("--num-samples", type=int, default=None, help="clips per side (default: the metric's protocol)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--i3d", default="i3d_k400.pt")
    p.add_argument("--i3d-kind", default="auto", choices=("auto", "reference", "torchscript"))
    p.add_argument("--real-stats", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--c3d", help="UCF-101 C3D: StyleGAN-V c3d_ucf101.pt, TGAN2 conv3d_deepnetA_ucf.npz or a state dict")
    p.add_argument("--c3d-mean", help="TGAN2 mean2.npz (with the Chainer .npz weights)")
    p.add_argument("--is-splits", type=int, default=None, help="IS splits (default: the protocol's 10)")
    p.add_argument("--clip-arch", default="ViT-B-32")
    p.add_argument("--clip-checkpoint", help="local open_clip checkpoint file")
    p.add_argument("--probe", help="a VideoProbe checkpoint (configs/eval/probe*.yaml)")
    p.add_argument("--inception", help="FID: local InceptionV3 weights pt_inception-2015-12-05-6726825d.pth "
                   "(torch-fidelity / pytorch-fid; never downloaded)")
    p.add_argument("--fid-frames", type=int, default=None, help="FID: first frames per clip (default: the protocol's 16)")
    p.add_argument("--fid-real-stats", default=None, help="FID: read/write real statistics here instead of the keyed "
                   "cache file")
    p.add_argument("--tracker", default="lk", choices=("lk", "flow"), help="TrajError: OpenCV pyramidal "
                   "Lucas-Kanade (default) or chained dense flow")
    p.add_argument("--flow-backend", default="dis", choices=("dis", "raft"), help="TrajError with --tracker flow")
    p.add_argument("--raft-weights", help="TrajError with --flow-backend raft: local torchvision RAFT-Large weights")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in wanted if m not in METRICS]
    if bad:
        p.error(f"--metrics: unknown {bad}; choose from {','.join(METRICS)}")
    for m in ("fvd", "fid"):
        if m in wanted and not args.real:
            p.error(f"--metrics {m} needs --real (shards or a statistics .npz)")
    if any(m not in ("fvd", "fid") for m in wanted) and not args.fake:
        p.error(f"--metrics {','.join(m for m in wanted if m not in ('fvd', 'fid'))} needs --fake")
    if "fid" in wanted and not args.inception:
        p.error("--metrics fid needs --inception (a local pt_inception-2015-12-05-6726825d.pth; weights are never "
                "downloaded)")
    if args.fid_frames is not None and args.fid_frames < 1:
        p.error("--fid-frames must be >= 1")
    if "trajerror" in wanted and not (args.fake or "").endswith(".npz"):
        p.error("--metrics trajerror needs --fake samples.npz with a 'trajectories' entry (Tora's predictions)")
    if args.tracker == "flow" and args.flow_backend == "raft" and not args.raft_weights:
        p.error("--flow-backend raft needs --raft-weights (a local torchvision RAFT-Large file)")
    if "is" in wanted and not args.c3d:
        p.error("--metrics is needs --c3d (a local C3D file; weights are never downloaded)")
    if "clipsim" in wanted and not args.clip_checkpoint:
        p.error("--metrics clipsim needs --clip-checkpoint (a local open_clip checkpoint)")
    if "accuracy" in wanted and not args.probe:
        p.error("--metrics accuracy needs --probe (a VideoProbe checkpoint, e.g. from configs/eval/probe_tiny.yaml)")

    results: dict[str, object] = {}
    t0 = time.time()
    if "fvd" in wanted:
        from vidgen import fvd

        argv_fvd = ["--real", args.real, "--i3d", args.i3d, "--i3d-kind", args.i3d_kind, "--batch-size",
                    str(args.batch_size), "--device", args.device]
        for flag, val in (("--fake", args.fake), ("--num-samples", args.num_samples), ("--real-stats", args.real_stats),
                          ("--cache-dir", args.cache_dir)):
            if val is not None:
                argv_fvd += [flag, str(val)]
        if args.no_cache:
            argv_fvd.append("--no-cache")
        out = fvd.run(argv_fvd)
        if out is not None:
            results["fvd"] = out
    if "fid" in wanted:
        from vidgen import fvd
        from vidgen.callbacks.metrics import FID_NUM_FRAMES, FID_NUM_SAMPLES, FrameFID, load_fid_inception

        fake = fvd.check_fake(p, args.fake)
        metric = FrameFID(load_fid_inception(args.inception, args.device), num_frames=args.fid_frames or FID_NUM_FRAMES)
        out = fvd.frechet(p, "FID", metric, args.real, fake, args.num_samples or FID_NUM_SAMPLES, args.batch_size,
                          args.device, real_stats=args.fid_real_stats, cache_dir=args.cache_dir, no_cache=args.no_cache)
        if out is not None:
            results["fid"] = out
    others = [m for m in wanted if m not in ("fvd", "fid")]
    if others:
        results.update(evaluate_fake(args, others))
    for k, v in results.items():
        if k == "is":
            print(f"IS {v['mean']:.4f} +- {v['std']:.4f} ({v['n']} clips)")
        elif k == "clipsim":
            print(f"CLIPSIM {v['value']:.4f} ({v['n']} clips)")
        elif k == "trajerror":
            print(f"TrajError {v['value']:.4f} px ({v['points']} points, {v['n']} clips, tracker {v['tracker']})")
        elif k == "accuracy":
            print("accuracy " + ", ".join(f"{h} {a * 100:.2f}%" for h, a in v["per_head"].items()) + f" ({v['n']} clips)")
    print(f"{time.time() - t0:.1f}s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def evaluate_fake(args, metrics: list[str]) -> dict:
    """IS / CLIPSIM / accuracy / TrajError over the generated clips of ``args.fake`` (one pass over the clips)."""
    from vidgen.callbacks.metrics import IS_NUM_FRAMES, IS_NUM_SPLITS, CLIPSimilarity, ProbeAccuracy, VideoInceptionScore

    dev = args.device
    ms: dict[str, object] = {}
    if "is" in metrics:
        ms["is"] = VideoInceptionScore(args.c3d, num_splits=args.is_splits or IS_NUM_SPLITS,
                                       mean_path=args.c3d_mean).to(dev)
    if "clipsim" in metrics:
        from vidgen.callbacks.metrics import load_open_clip

        model, tok, size, mean, std = load_open_clip(args.clip_arch, args.clip_checkpoint, dev)
        ms["clipsim"] = CLIPSimilarity(model, tok, size, mean, std).to(dev)
    if "accuracy" in metrics:
        ms["accuracy"] = ProbeAccuracy(args.probe).to(dev)
    if "trajerror" in metrics:
        from vidgen.lightning_modules.nn.trajectory import TrajError

        ms["trajerror"] = TrajError(args.tracker, args.flow_backend, args.raft_weights)
    need_frames = IS_NUM_FRAMES if "is" in ms else None
    counts = {k: 0 for k in ms}
    skipped = 0
    for i, frames, label, caption, trajs in iter_fake(args.fake, need_frames, args.num_samples):
        if frames is None:
            skipped += 1
            continue
        v = _video(frames).to(dev)
        if "is" in ms:
            ms["is"].update(v, index=torch.tensor([i]))
            counts["is"] += 1
        if "clipsim" in ms and caption:
            ms["clipsim"].update(v, [caption])
            counts["clipsim"] += 1
        if "accuracy" in ms and (label >= 0 or caption):
            ms["accuracy"].update(v, labels=torch.tensor([label]), captions=[caption])
            counts["accuracy"] += 1
        if "trajerror" in ms:
            if trajs is None:
                raise SystemExit(f"vidgen eval: error: --metrics trajerror: {args.fake} has no 'trajectories' entry "
                                 "(sample with Tora through `vidgen predict`, whose writer stores them)")
            ms["trajerror"].update(v, [trajs])
            counts["trajerror"] += 1
    out: dict[str, object] = {}
    if "is" in ms:
        mean, std = (float(x) for x in ms["is"].compute())
        out["is"] = {"mean": mean, "std": std, "n": counts["is"], "skipped": skipped}
    if "clipsim" in ms:
        out["clipsim"] = {"value": float(ms["clipsim"].compute()), "n": counts["clipsim"]}
    if "trajerror" in ms:
        te = ms["trajerror"]
        out["trajerror"] = {"value": float(te.compute()), "points": int(te.count), "n": counts["trajerror"],
                            "tracker": args.tracker}
    if "accuracy" in ms:
        out["accuracy"] = {"per_head": {k: float(v) for k, v in ms["accuracy"].compute().items()},
                           "n": counts["accuracy"]}
    return out


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
