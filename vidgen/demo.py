"""``vidgen demo`` (what ``make demo`` runs): build the embedded data, stream it, and train every model on it.

Each stage is ``run(ctx) -> dict``; its dict (with ``outputs`` paths) goes into the final summary and into
``ctx.results[stage]`` for the stages after it (e.g. the tokenizer checkpoint that MAGVIT and Latte load).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

# (name, "module:function", what it shows)
STAGES = [
    ("data", "vidgen.demo:stage_data", "build the embedded dataset (real footage + procedural shapes)"),
    ("probe", "vidgen.demos.probe:run", "train the probe (3D-CNN classifier of class/shape/colour/direction) on real clips"),
    ("stream", "vidgen.demo:stage_stream", "stream the demo shards end to end, save decoded clips, report clips/s"),
    ("tokenizer", "vidgen.demos.tokenizer:run", "train the tiny video tokenizer, write reconstructions"),
    ("vae", "vidgen.demos.tokenizer:run_vae", "train the tiny KL VAE whose latents the Latte stage learns"),
    ("magvit", "vidgen.demos.magvit:run", "train the tiny MAGVIT transformer, sample class/frame-prediction clips"),
    ("videopoet", "vidgen.demos.videopoet:run",
     "train a tiny VideoPoet prefix LM on the tokenizer's tokens (AGD over T2V/I2V/FP), sample, extend a long video"),
    ("videopoet_sr", "vidgen.demos.videopoet_sr:run",
     "train a tiny VideoPoet super-resolution stage (16^2 -> 32^2 in token space), PSNR vs bicubic"),
    ("videopoet_audio", "vidgen.demos.videopoet_audio:run",
     "tiny SoundStream on the demo soundtracks, VideoPoet video-to-audio; a spectral probe names the shape"),
    ("latte", "vidgen.demos.latte:run", "train a tiny class-conditional Latte on the KL VAE latents, sample"),
    ("tora", "vidgen.demos.tora:run", "train a tiny STDiT3 + Tora on exact trajectories; TrajError true vs reversed"),
    ("make_a_video", "vidgen.demos.make_a_video:run",
     "text-to-video with no text-video pairs: tiny CLIP, prior on frames+captions, D then D^t on uncaptioned clips"),
    ("make_a_video_cascade", "vidgen.demos.make_a_video:run_cascade",
     "Make-A-Video cascade: ↑F, SR_l^t, SR_h on the clips; text -> P -> D^t -> ↑F -> SR_l^t -> SR_h, every stage kept"),
]


# What each stage reads from earlier ones (``ctx.results``): with ``--jobs 2`` (the default) independent stages run
# side by side, one thread each — tiny models are per-op bound, so two one-thread processes do about twice the work of
# one two-thread process. A stage not listed here waits for every stage before it.
DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "probe": ("data",),
    "stream": ("data",),
    "tokenizer": ("data",),
    "vae": ("data",),
    "magvit": ("tokenizer", "probe"),
    "videopoet": ("tokenizer", "probe"),
    "videopoet_sr": ("tokenizer", "probe"),
    "videopoet_audio": ("tokenizer",),
    "latte": ("vae", "probe"),
    "tora": ("vae", "probe"),
    "make_a_video": ("probe",),
    "make_a_video_cascade": ("make_a_video", "probe"),
}


# CPU-seconds of each stage in a fresh-clone ``make demo`` (session 9's last run, 162cfce, 2026-12-03; magvit scaled to
# its 2000 steps of session 14): used only to choose which ready stage starts (``next_stage``; an unlisted stage counts
# DEFAULT_COST).
COST: dict[str, float] = {
    "probe": 64, "stream": 2, "tokenizer": 339, "vae": 120, "magvit": 690, "videopoet": 65, "videopoet_sr": 59,
    "videopoet_audio": 232, "latte": 147, "tora": 106, "make_a_video": 124, "make_a_video_cascade": 237,
}
DEFAULT_COST = 60.0


def chain_seconds(name: str, order: list[str]) -> float:
    """``name``'s cost plus the longest chain of the stages in ``order`` that wait for it (directly or not)."""
    after = [n for n in order if name in depends_on(n, order)]
    return COST.get(name, DEFAULT_COST) + max((chain_seconds(n, order) for n in after), default=0.0)


def planned_finish(now: float, running: dict[str, float], done: set[str], pending: list[str], order: list[str],
                   jobs: int) -> float:
    """When the run ends (by ``COST``) if ``pending`` start longest-chain-first as lanes free up; ``running`` maps the
    running stages to their expected ends."""
    running, done = dict(running), set(done)
    pending = sorted(pending, key=lambda n: -chain_seconds(n, order))
    t = now
    while running or pending:
        for n in [n for n in pending if all(d in done for d in depends_on(n, order))][:max(0, jobs - len(running))]:
            pending.remove(n)
            running[n] = t + COST.get(n, DEFAULT_COST)
        if not running:  # what is left waits for a stage outside this run
            break
        n = min(running, key=running.__getitem__)
        t = running.pop(n)
        done.add(n)
    return t


def next_stage(ready: list[str], running: dict[str, float], done: set[str], pending: list[str], order: list[str],
               now: float, jobs: int) -> str:
    """The ready stage to start now: the one after whose start the run is planned to end first (the rest by
    :func:`planned_finish`); ties: the longest remaining chain, then ``order``. Longest-chain-first alone leaves a lane
    idle at the end whenever the last stages do not pair up (session 9's timings: 27 s of 899)."""
    def finish(n: str) -> float:
        rest = [p for p in pending if p != n]
        return planned_finish(now, {**running, n: now + COST.get(n, DEFAULT_COST)}, done, rest, order, jobs)

    return min(ready, key=lambda n: (round(finish(n), 6), -chain_seconds(n, order), order.index(n)))


def depends_on(name: str, order: list[str]) -> tuple[str, ...]:
    """The stages ``name`` waits for, among those in ``order`` (the run's stages, in STAGES order)."""
    if name in DEPENDS:
        return tuple(d for d in DEPENDS[name] if d in order)
    return tuple(order[:order.index(name)])


# issue 10 §1: what the demo must show on its held-out split; (stage, result key path, threshold, what)
TARGETS = [
    ("probe", ("accuracy", "class"), 0.95, "probe class accuracy on real val clips (the ceiling)"),
    ("tokenizer", ("psnr",), 28.0, "MAGVIT 3D-VQ tokenizer PSNR (dB), procedural val clips"),
    ("vae", ("psnr",), 30.0, "KL VAE PSNR (dB), procedural val clips"),
    ("magvit", ("probe", "class", "accuracy"), 0.70, "MAGVIT class-conditional: probe class accuracy"),
    ("magvit", ("probe_fp", "direction", "accuracy"), 0.70, "MAGVIT frame prediction: probe direction accuracy"),
    ("latte", ("probe", "class", "accuracy"), 0.70, "Latte class-conditional: probe class accuracy"),
]


def target_rows(results: dict) -> list[tuple[str, float | None, float, bool | None]]:
    """``(what, measured or None, threshold, met or None)`` for every §1 target (None: the stage did not run)."""
    rows = []
    for stage, path, threshold, what in TARGETS:
        v = results.get(stage)
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        value = float(v) if isinstance(v, (int, float)) else None
        rows.append((what, value, threshold, None if value is None else value >= threshold))
    return rows


def format_target(what: str, value: float | None, threshold: float, met: bool | None) -> str:
    pct = threshold <= 1.0
    fmt = (lambda x: f"{x * 100:.0f}%") if pct else (lambda x: f"{x:.2f}")
    got = "not run" if value is None else fmt(value)
    mark = "" if met is None else ("  ok" if met else "  BELOW TARGET")
    return f"{what}: {got} (target >= {fmt(threshold)}){mark}"


@dataclasses.dataclass
class DemoContext:
    data_dir: Path
    out_dir: Path
    fast: bool = False
    seed: int = 0
    results: dict = dataclasses.field(default_factory=dict)

    def log(self, msg: str):
        print(f"    {msg}", flush=True)


def rebase_paths(obj, old_root: str | None, new_root: Path):
    """``obj`` (a stage's result from an earlier run's ``summary.json``) with every string under ``old_root`` (that
    run's ``--out-dir``, as it was written) moved under ``new_root``: a demo folder that was copied, moved or written
    from another working directory still hands its checkpoints to ``--only`` reruns."""
    if not old_root or Path(old_root) == Path(new_root):
        return obj
    old = str(Path(old_root))
    if isinstance(obj, dict):
        return {k: rebase_paths(v, old_root, new_root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rebase_paths(v, old_root, new_root) for v in obj]
    if isinstance(obj, str) and (obj == old or obj.startswith(old + os.sep)):
        return str(Path(new_root) / os.path.relpath(obj, old))
    return obj


def stage_data(ctx: DemoContext) -> dict:
    from vidgen.demo_data import HALF_SIZE, TRAIN_REPS, build_demo_data

    manifest_path = ctx.data_dir / "manifest.json"
    manifest, want = None, {"seed": ctx.seed, "fast": ctx.fast, "train_reps": TRAIN_REPS}
    if manifest_path.exists():
        with open(manifest_path) as f:
            manifest = json.load(f)
        stale = {k: manifest.get(k) for k, v in want.items() if manifest.get(k) != v}
        if stale:  # built by an older version or with other options: rebuild rather than train on the wrong set
            ctx.log(f"{ctx.data_dir} was built with {stale}, this demo needs {want}: rebuilding it")
            manifest = None
        else:
            ctx.log(f"using existing {ctx.data_dir} (delete it to rebuild)")
    if manifest is None:
        manifest = build_demo_data(str(ctx.data_dir), seed=ctx.seed, fast=ctx.fast)
    counts = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    return {"summary": f"samples per split {counts}", "outputs": [str(ctx.data_dir)]}


def stage_stream(ctx: DemoContext) -> dict:
    from vidgen.datamodules import VideoDataModule
    from vidgen.datamodules.media import save_video_grid_mp4, write_grid_png

    out = ctx.out_dir / "stream"
    out.mkdir(parents=True, exist_ok=True)
    dm = VideoDataModule(
        sources=[{"shards": str(ctx.data_dir / "train"), "weight": 0.8, "name": "videos"},
                 {"shards": str(ctx.data_dir / "images"), "weight": 0.2, "name": "images"}],
        val_shards=str(ctx.data_dir / "val"), seed=ctx.seed, num_frames=16, frame_stride=1, resolution=64,
        batch_size=8, num_workers=2, image_frames="single", flip=False)  # flip would reverse "moving left" captions
    dm.setup("fit")
    n_batches = 6 if ctx.fast else 20
    it = iter(dm.train_dataloader())
    first = next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    clips, shapes = 0, {}
    videos = None
    for _ in range(n_batches):
        b = next(it)
        clips += b["video"].shape[0]
        shape = tuple(b["video"].shape[1:])
        shapes[shape] = shapes.get(shape, 0) + 1
        if videos is None and b["video"].shape[2] > 1:
            videos, texts = b["video"], b["text"]
    dt = time.perf_counter() - t0
    if videos is None:
        videos, texts = first["video"], first["text"]
    write_grid_png(str(out / "train_clips.png"), videos[:8], max_frames=8)
    save_video_grid_mp4(str(out / "train_clips.mp4"), videos[:8], fps=8)
    with open(out / "captions.txt", "w") as f:
        f.write("\n".join(texts[:8]) + "\n")
    val = next(iter(dm.val_dataloader()))
    write_grid_png(str(out / "val_clips.png"), val["video"][:8], max_frames=8)
    rate = clips / dt
    ctx.log(f"{clips} clips in {dt:.1f}s = {rate:.1f} clips/s (16x64x64, 2 workers); batch shapes {shapes}")
    ctx.log(f"data counters: {dm.data_counters()}")
    return {"summary": f"{rate:.1f} clips/s at 16x64x64; mixed image/video batches {len(shapes)} shapes",
            "clips_per_s": rate, "outputs": [str(out / "train_clips.png"), str(out / "train_clips.mp4"),
                                             str(out / "val_clips.png")]}


def probe_entries(results: dict) -> list[tuple[str, dict]]:
    """``(label, {head: {"accuracy", "ceiling", "chance", "n"}})`` for every ``probe`` / ``probe_<what>`` entry of
    the stage results (``report_samples`` makes them): the per-generator lines of the summary."""
    out = []
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        for key in sorted(r):
            v = r[key]
            if (key == "probe" or key.startswith("probe_")) and isinstance(v, dict) and v and all(
                    isinstance(h, dict) and "accuracy" in h for h in v.values()):
                out.append((name if key == "probe" else f"{name}/{key[6:]}", v))
    return out


def format_probe_entry(entry: dict) -> str:
    return "; ".join(f"{k} {v['accuracy'] * 100:.0f}% (" + (f"real {v['ceiling'] * 100:.0f}%, " if v.get("ceiling")
                     is not None else "") + f"chance {v['chance'] * 100:.0f}%)" for k, v in entry.items())


def _jsonable(res: dict) -> dict:
    """The JSON-serialisable entries of a stage result (numbers, strings, paths, nested dicts/lists of those)."""
    out = {}
    for k, v in res.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children (data-loading workers): on a shared
    machine this, not wall time, says what a stage costs on a quiet one."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _load(target: str):
    module, _, fn = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None  # that model is not part of the suite yet
        raise
    return getattr(mod, fn)


class _PrefixedStream:
    """stdout/stderr of a stage running in its own process: every line prefixed with the stage's name."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self.at_line_start and piece.strip():
                out.append(self.prefix)
            out.append(piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _stage_in_child(name: str, target: str, ctx: "DemoContext", threads: int, conn) -> None:
    """Run one stage in a forkserver child with ``threads`` torch threads; send back its (JSON-able) result."""
    import multiprocessing as mp

    import torch

    # a forkserver child inherits "forkserver" as its start method: its DataLoader workers would come from a second
    # server (a torch import per stage) and outlive it; fork them from this process as a normal run does
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    sys.stdout = _PrefixedStream(sys.__stdout__, f"[{name}] ")
    sys.stderr = _PrefixedStream(sys.__stderr__, f"[{name}] ")
    import warnings

    warnings.filterwarnings("ignore")
    _quiet_trainers()
    c0 = _cpu_seconds()
    try:
        res = _load(target)(ctx) or {}
        failed = False
    except Exception as e:  # reported by the parent like a failure in-process
        traceback.print_exc()
        res, failed = {"summary": f"FAILED: {type(e).__name__}: {e}", "outputs": []}, True
    res = _jsonable(res)
    res.setdefault("cpu_seconds", round(_cpu_seconds() - c0, 1))
    conn.send((res, failed))
    conn.close()


#: what the stages' forkserver imports once, before it forks them (torch + lightning: ~12 CPU-s on one core)
FORKSERVER_PRELOAD = ["torch", "lightning", "numpy"]


def start_forkserver() -> None:
    """Start the stages' forkserver now, without waiting for it: its preload then runs beside the data stage instead
    of holding up the first stage (``Process.start`` blocks until the server has imported ``FORKSERVER_PRELOAD``;
    measured 12.6 s)."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    forkserver.ensure_running()


def _run_parallel(stages: list[tuple[str, str, str]], ctx: "DemoContext", jobs: int, rows: list) -> bool:
    """Run ``stages`` (after ``data``) ``jobs`` at a time in child processes as their dependencies finish."""
    import multiprocessing as mp

    mpc = mp.get_context("forkserver")
    mpc.set_forkserver_preload(FORKSERVER_PRELOAD)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    order = [n for n, *_ in stages]
    pending = list(stages)
    running: dict[str, tuple] = {}  # name -> (process, connection, t0, what)
    done: set[str] = set(ctx.results) | {"data"}
    failed_any = False
    finished: dict[str, tuple] = {}
    while pending or running:
        while len(running) < jobs:
            ready = [st[0] for st in pending if all(d in done for d in depends_on(st[0], order))]
            if not ready:
                break
            now = time.perf_counter()
            ends = {n: max(t0 + COST.get(n, DEFAULT_COST), now + 1.0) for n, (_, _, t0, _) in running.items()}
            pick = next_stage(ready, ends, done, [st[0] for st in pending], order, now, jobs)
            st = next(st for st in pending if st[0] == pick)
            name, target, what = st
            pending.remove(st)
            if _load(target) is None:
                print(f"[{name}] {what}: not implemented yet; skipped", flush=True)
                finished[name] = ("skipped (not implemented yet)", 0.0, [])
                done.add(name)
                continue
            print(f"[{name}] start: {what}", flush=True)
            recv, send = mpc.Pipe(duplex=False)
            proc = mpc.Process(target=_stage_in_child, args=(name, target, ctx, threads, send), daemon=False)
            proc.start()
            send.close()
            running[name] = (proc, recv, time.perf_counter(), what)
        if not running:
            if pending:  # what is left waits for a stage that did not run
                for name, _, _ in pending:
                    finished[name] = ("skipped (a stage it needs did not run)", 0.0, [])
                pending.clear()
            break
        from multiprocessing.connection import wait

        ready = wait([r for _, r, _, _ in running.values()] + [p.sentinel for p, *_ in running.values()])
        for name in [n for n, (p, r, _, _) in running.items() if r in ready or p.sentinel in ready]:
            proc, recv, t0, _ = running.pop(name)
            try:
                res, failed = recv.recv()
            except EOFError:  # the child died without a result (killed, out of memory)
                res, failed = {"summary": f"FAILED: the stage's process ended with code {proc.exitcode}",
                               "outputs": []}, True
            proc.join()
            dt = time.perf_counter() - t0
            failed_any |= failed
            ctx.results[name] = res
            done.add(name)
            finished[name] = (res.get("summary", ""), dt, res.get("outputs", []))
            print(f"[{name}] done in {dt:.1f}s wall, {res.get('cpu_seconds', 0):.1f}s CPU", flush=True)
    rows += [(n, *finished[n]) for n in order if n in finished]
    return failed_any


def _run_sequential(stages: list[tuple[str, str, str]], ctx: "DemoContext", rows: list) -> bool:
    failed = False
    for i, (name, target, what) in enumerate(stages, 1):
        fn = _load(target)
        print(f"[{i}/{len(stages)}] {name}: {what}", flush=True)
        if fn is None:
            print("    not implemented yet; skipped", flush=True)
            rows.append((name, "skipped (not implemented yet)", 0.0, []))
            continue
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            res = fn(ctx) or {}
        except Exception as e:  # keep going: later stages that do not depend on this one still run
            traceback.print_exc()
            res = {"summary": f"FAILED: {type(e).__name__}: {e}", "outputs": []}
            failed = True
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        res.setdefault("cpu_seconds", round(cpu, 1))
        ctx.results[name] = res
        rows.append((name, res.get("summary", ""), dt, res.get("outputs", [])))
        print(f"    done in {dt:.1f}s wall, {cpu:.1f}s CPU", flush=True)
    return failed


def _quiet_trainers() -> None:
    """The stages build many small Trainers: no "GPU available" banners or promotional tips between their lines."""
    import logging

    from vidgen.cli import _quiet_lightning

    _quiet_lightning()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidgen demo", description=__doc__)
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--out-dir", default="outputs/demo")
    p.add_argument("--fast", action="store_true", help="fewer steps everywhere (smoke test)")
    p.add_argument("--only", nargs="*", help="run only these stages (data is always built)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="stages run side by side when they do not depend on each other, one process each "
                        "(default: 2, or 1 on a one-core machine); 1 runs them one after the other in this process")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import warnings

    warnings.filterwarnings("ignore")
    _quiet_trainers()
    ctx = DemoContext(Path(args.data_dir), Path(args.out_dir), fast=args.fast, seed=args.seed)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    stages = [s for s in STAGES if not args.only or s[0] in args.only or s[0] == "data"]
    previous = ctx.out_dir / "summary.json"
    if args.only and previous.exists():  # stages not rerun hand their last results (checkpoints) to later ones
        with open(previous) as f:
            for name, entry in json.load(f).items():
                if name not in args.only and isinstance(entry.get("result"), dict):
                    ctx.results[name] = rebase_paths(entry["result"], entry.get("out_dir"), ctx.out_dir)
        if ctx.results:
            print(f"reusing the results of {sorted(ctx.results)} from {previous}", flush=True)
    t_all, cpu_all = time.perf_counter(), _cpu_seconds()
    rows: list = []
    if args.jobs > 1:
        data = [st for st in stages if st[0] == "data"]
        rest = [st for st in stages if st[0] != "data"]
        if rest:
            start_forkserver()
        failed = _run_sequential(data, ctx, rows)
        failed |= _run_parallel(rest, ctx, args.jobs, rows)
    else:
        failed = _run_sequential(stages, ctx, rows)
    from vidgen.demos.common import CLIP_CACHE

    shutil.rmtree(ctx.out_dir / CLIP_CACHE, ignore_errors=True)  # the stages' shared decoded clips (~0.3 GB)
    total = time.perf_counter() - t_all
    cpu_total = sum(float(ctx.results.get(n, {}).get("cpu_seconds") or 0) for n, *_ in rows)
    if args.jobs == 1:
        cpu_total = _cpu_seconds() - cpu_all
    lines = ["", "=" * 78, f"vidgen demo finished in {total:.0f}s wall ({cpu_total:.0f}s CPU, --jobs {args.jobs}); outputs "
             f"under {ctx.out_dir}/", "=" * 78]
    for name, summary, dt, outputs in rows:
        cpu = ctx.results.get(name, {}).get("cpu_seconds")
        lines.append(f"{name:<10} {dt:6.1f}s" + (f" ({cpu:.0f}s CPU)" if cpu is not None else "") + f"  {summary}")
        lines += [f"{'':<18}-> {o}" for o in outputs]
    lines += ["", "issue-10 targets (held-out split):"] + [f"  {format_target(*r)}" for r in target_rows(ctx.results)]
    ran = {name for name, *_ in rows}
    entries = [(n, e) for n, e in probe_entries(ctx.results) if n.split("/")[0] in ran]
    if entries:
        lines += ["", "probe accuracy on each generator's samples (real val clips = the ceiling; chance):"]
        lines += [f"{name:<10} {format_probe_entry(e)}" for name, e in entries]
    print("\n".join(lines), flush=True)
    entries = {}
    if args.only and previous.exists():  # a partial rerun keeps the other stages' entries (their checkpoints)
        with open(previous) as f:
            entries = json.load(f)
    entries.update({n: {"summary": s, "seconds": round(d, 1), "cpu_seconds": ctx.results.get(n, {}).get("cpu_seconds"),
                        "outputs": o, "result": _jsonable(ctx.results.get(n, {})), "out_dir": str(ctx.out_dir)}
                    for n, s, d, o in rows})
    tmp = ctx.out_dir / "summary.json.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, ctx.out_dir / "summary.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
