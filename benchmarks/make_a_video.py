"""Pseudo-3D vs full-3D convolutions in the Make-A-Video U-Net (spec make_a_video_videopoet.md §1.3, Eq. 2: the
paper factorises space and time because full 3D layers cost too much): train steps/s, FLOPs and peak memory of the
same U-Net (same widths, same pseudo-3D attention) with ``conv_type='pseudo3d'`` against ``conv_type='full3d'``
(every 3x3 conv a 3x3x3 Conv3d) at 16 x 64^2 clips.

CPU (default): each variant in its own process (peak RSS is that variant's alone), fp32, AdamW, eps-MSE loss:

    python benchmarks/make_a_video.py                     # width 32 x (1, 2, 2), batch 1, 3 timed steps
    python benchmarks/make_a_video.py --width 64 --steps 5

GPU (``--gpu``): bf16 autocast on one GPU, peak memory from ``torch.cuda.max_memory_allocated``
(``--width 128 --batch 4`` is closer to a real decoder). Numbers measured on a shared machine are inflated by
contention; the ratio between the two variants, measured side by side, is what the script is for.

The cascade (issue 14, Eq. 1), ``--cascade``: seconds per denoising step and per stage (at the cascade recipe's
steps) for ONE clip through P, D^t, ↑F, SR_l^t and SR_h with random weights, at the demo's tiny sizes (8 x 16^2 ->
36 x 16^2 -> 36 x 32^2 -> 36 x 64^2) and at paper sizes (16 x 64^2 -> 76 x 64^2 -> 76 x 256^2 -> 76 x 768^2,
``configs/make_a_video/*.yaml`` widths); then the peak memory of SR_h with and without frame batches (each variant
in its own process):

    python benchmarks/make_a_video.py --cascade                      # tiny + paper sizes, CPU
    python benchmarks/make_a_video.py --cascade --sizes tiny         # the demo's sizes only
    python benchmarks/make_a_video.py --cascade --gpu                # one GPU, bf16 autocast

On CPU a paper-size step of SR_l^t / SR_h over 76 frames takes minutes: ``--max-frames K`` (default 4 on CPU, all on
GPU) times K frames and scales the per-frame stages linearly to 76 (exact for SR_h, which sees frames alone; for
SR_l^t, whose 16-frame windows are what one U-Net call sees, it times one window and scales by the window count).

Measured (issue 14) on the shared 2-core CPU, one thread, under heavy contention (inflated; ratios are what count):
tiny: P 0.0 s, D^t 0.6 s (20 steps, CFG), ↑F 0.4 s (8), SR_l^t 0.4 s (4), SR_h 0.7 s (4): 2.2 s per clip; paper
(``--max-frames 1``): s/step P 0.16, D^t 346, ↑F 416, SR_l^t 659, SR_h 2628 -> about 27 h per clip on one CPU
thread (SR_h 43%, D^t 22%, SR_l^t 21%, ↑F 14% at 64 / 32 / 32 / 16 steps). SR_h peak memory over a 76-frame clip
(tiny SR_h, 64^2 out): 1115 MiB all frames at once vs 874 MiB with frame_batch 4 (x1.28; sampling's own memory 273
vs 32 MiB). No GPU was lent for this issue: run ``--gpu`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_variant(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion
    from vidgen.lightning_modules.nn.unet import UNet, UNetConfig

    device = "cuda" if args.gpu else "cpu"
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=args.width, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                     num_head_channels=32, groups=8, cond_dim=64, temporal=True, fps_cond=True,
                     conv_type=args.variant)
    net = UNet(cfg).to(device)
    diff = create_diffusion(DiffusionConfig(schedule="cosine", predict="eps", learn_sigma=False, loss="mse"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 3, args.frames, args.res, args.res, generator=g).to(device)
    kw = {"cond": torch.randn(args.batch, 64, generator=g).to(device), "fps": torch.full((args.batch,), 8.0, device=device)}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.gpu):
            loss = diff.training_losses(net, x0, kw)["loss"].mean()
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            net(x0, torch.zeros(args.batch, dtype=torch.long, device=device), **kw)
    fwd_flops = fc.get_total_flops()
    step()  # warm-up (allocator, kernels)
    if args.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": args.variant, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
            "fwd_GFLOP": fwd_flops / 1e9, "steps_per_s": args.steps / dt, "peak_MiB": peak,
            "peak_kind": "cuda max allocated" if args.gpu else f"max RSS (before timing {rss0 / 1024:.0f} MiB)"}


# ---------------------------------------------------------------------------------------------------- the cascade
CASCADE_SIZES = {
    # frames, base res, skip, SR_l x, SR_h x; U-Nets: D^t / ↑F, SR_l^t, SR_h; prior width/depth; steps per stage
    "tiny": dict(frames=8, res=16, skip=5, srl_x=2, srh_x=2, chunk=16,
                 dec=dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,),
                          num_head_channels=32, groups=8, num_cond_tokens=2),
                 sr=dict(model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(),
                         num_head_channels=8, groups=4),
                 srh=None, prior=dict(dim=64, depth=2, heads=2),
                 steps=dict(prior=32, decoder=20, interpolation=8, sr_low=4, sr_high=4)),
    "paper": dict(frames=16, res=64, skip=5, srl_x=4, srh_x=3, chunk=16,
                  dec=dict(size="base64", num_cond_tokens=4),
                  sr=dict(model_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(3,),
                          num_head_channels=64),
                  srh=dict(model_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attention_levels=(),
                           num_head_channels=64),
                  prior=dict(dim=768, depth=12, heads=12),
                  steps=dict(prior=64, decoder=64, interpolation=32, sr_low=32, sr_high=16)),
}


def _sync(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


def time_cascade(size: str, gpu: bool, max_frames: int | None) -> list[dict]:
    """Seconds per denoising step of each stage for one clip (random weights; the first call is a warm-up)."""
    import torch

    from vidgen.lightning_modules.clip import CLIP_SIZES
    from vidgen.lightning_modules.make_a_video import DiffusionPrior, MakeAVideoDecoder
    from vidgen.lightning_modules.make_a_video_interp import MaskedFrameInterpolation
    from vidgen.lightning_modules.make_a_video_sr import MakeAVideoSR, temporal_windows

    c = CASCADE_SIZES[size]
    dev = "cuda" if gpu else "cpu"
    clip = {"model_cfg": CLIP_SIZES["tiny"]}  # the CLIP towers are not timed (one text encoding per prompt)
    rows = []

    def timed(name: str, fn, frames_timed: int, scale: float, out_shape: str) -> None:
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu):
            if gpu or size == "tiny":  # warm-up (a paper-size CPU step takes minutes: its first-call overhead is noise)
                fn()
            _sync(gpu)
            t0 = time.perf_counter()
            fn()
            _sync(gpu)
        per_step = (time.perf_counter() - t0) * scale
        steps = c["steps"][name]
        rows.append({"size": size, "stage": name, "output": out_shape, "s_per_step": per_step,
                     "steps": steps, "s_stage": per_step * steps,
                     "note": "" if scale == 1 else f"timed {frames_timed} frames, x{scale:g}"})

    prior = DiffusionPrior(clip=clip, max_text_len=12, **c["prior"]).to(dev).eval()
    cond = prior.text_conditions(["a dog wearing a superhero cape flying through the sky"])
    x = torch.randn(1, prior.config.embed_dim, device=dev)
    t = torch.zeros(1, dtype=torch.long, device=dev)
    timed("prior", lambda: prior.network(x, t, **cond), 1, 1, "y_e")

    f, r = c["frames"], c["res"]
    dec = MakeAVideoDecoder(stage="video", unet=c["dec"], clip=clip, num_frames=f, resolution=r).to(dev).eval()
    y = torch.randn(1, 64, device=dev)
    xv = torch.randn(1, 3, f, r, r, device=dev)
    fps = torch.full((1,), 3.0, device=dev)
    timed("decoder", lambda: dec.unet(torch.cat([xv, xv]), torch.cat([t, t]), cond=torch.cat([y, y]),
                                      fps=torch.cat([fps, fps])), f, 1, f"{f}x{r}^2 (CFG: 2 passes)")
    del dec

    t_out = (f - 1) * c["skip"] + 1
    up = MaskedFrameInterpolation(unet=c["dec"], clip=clip, num_frames=t_out, resolution=r,
                                  frame_skips=[c["skip"]]).to(dev).eval()
    xi = torch.randn(1, 3, t_out, r, r, device=dev)
    xc = torch.randn(1, 4, t_out, r, r, device=dev)
    timed("interpolation", lambda: up.unet(xi, t, cond=y, fps=fps, frame_skip=fps, x_cond=xc), t_out, 1,
          f"{t_out}x{r}^2")
    del up

    r2 = r * c["srl_x"]
    srl = MakeAVideoSR(stage="spatiotemporal", phase="video", unet=c["sr"], scale_factor=c["srl_x"], resolution=r2,
                       num_frames=t_out).to(dev).eval()
    chunk = min(c["chunk"], t_out)
    windows = len(temporal_windows(t_out, c["chunk"], 4))
    k = chunk if not max_frames else min(chunk, max_frames)
    xs = torch.randn(1, 3, k, r2, r2, device=dev)
    aug = torch.zeros(1, device=dev)
    timed("sr_low", lambda: srl.unet(xs, t, x_cond=xs, aug_level=aug), k, windows * chunk / k,
          f"{t_out}x{r2}^2 ({windows} windows of {chunk})")
    del srl

    r3 = r2 * c["srh_x"]
    srh = MakeAVideoSR(stage="spatial", phase="image", unet=c["srh"] or c["sr"], scale_factor=c["srh_x"],
                       resolution=r3).to(dev).eval()
    k = t_out if not max_frames else min(t_out, max_frames)
    xh = torch.randn(k, 3, r3, r3, device=dev)
    th, augh = torch.zeros(k, dtype=torch.long, device=dev), torch.zeros(k, device=dev)
    timed("sr_high", lambda: srh.unet(xh, th, x_cond=xh, aug_level=augh), k, t_out / k, f"{t_out}x{r3}^2")
    return rows


def srh_memory(args) -> dict:
    """Peak memory of one SR_h sampling step over a clip, with ``args.frame_batch`` frames per U-Net call."""
    import torch

    from vidgen.lightning_modules.make_a_video_sr import MakeAVideoSR

    dev = "cuda" if args.gpu else "cpu"
    c = CASCADE_SIZES[args.mem_size]
    r_in = c["res"] * c["srl_x"]
    srh = MakeAVideoSR(stage="spatial", phase="image", unet=c["srh"] or c["sr"], scale_factor=c["srh_x"],
                       resolution=r_in * c["srh_x"], sample_steps=2).to(dev).eval()
    frames = args.mem_frames
    low = torch.rand(1, 3, frames, r_in, r_in, device=dev) * 2 - 1
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=args.gpu):
        srh.upsample(low, torch.Generator(device=dev).manual_seed(0), steps=2, frame_batch=args.frame_batch)
    _sync(args.gpu)
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"frame_batch": args.frame_batch, "frames": frames, "out": f"{r_in * c['srh_x']}^2", "peak_MiB": peak,
            "before_MiB": base, "seconds": dt}


def cascade_main(args) -> int:
    import torch

    torch.manual_seed(0)
    if not args.gpu:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or torch.get_num_threads())))
    max_frames = args.max_frames if args.max_frames is not None else (None if args.gpu else 4)
    # SR_h memory first, in child processes: on Linux a child inherits its parent's max RSS, so it is measured
    # before this process holds the paper-size stages
    mem = []
    for fb in (0, args.frame_batch):
        cmd = [sys.executable, __file__, "--srh-memory", "--frame-batch", str(fb), "--mem-size", args.mem_size,
               "--mem-frames", str(args.mem_frames)] + (["--gpu"] if args.gpu else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        mem.append(json.loads(out))
    mem_lines = [f"SR_h peak memory, two sampling steps over a {args.mem_frames}-frame clip ({args.mem_size} SR_h, output "
          f"{mem[0]['out']}; {'cuda max allocated' if args.gpu else 'max RSS'}):"]
    for m in mem:
        what = "all frames at once" if not m["frame_batch"] else f"frame_batch {m['frame_batch']}"
        mem_lines.append(f"  {what:<20} {m['peak_MiB']:>8.0f} MiB peak, {m['peak_MiB'] - m['before_MiB']:>7.0f} MiB above the "
              f"process before sampling   ({m['seconds']:.1f}s)")
    mem_lines.append(f"  without / with frame batching: peak x{mem[0]['peak_MiB'] / mem[1]['peak_MiB']:.2f} "
          f"({mem[0]['peak_MiB'] - mem[1]['peak_MiB']:.0f} MiB saved)")
    rows = []
    for size in args.sizes.split(","):
        rows += time_cascade(size, args.gpu, None if size == "tiny" else max_frames)
    print(f"Make-A-Video cascade, one clip, random weights, {'GPU bf16' if args.gpu else 'CPU fp32'} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'size':<6} {'stage':<14} {'output':<28} {'s/step':>9} {'steps':>6} {'s/stage':>9}  note")
    for size in args.sizes.split(","):
        sub = [r for r in rows if r["size"] == size]
        for r in sub:
            print(f"{r['size']:<6} {r['stage']:<14} {r['output']:<28} {r['s_per_step']:>9.3f} {r['steps']:>6} "
                  f"{r['s_stage']:>9.1f}  {r['note']}")
        print(f"{size:<6} {'total':<14} {'':<28} {'':>9} {'':>6} {sum(r['s_stage'] for r in sub):>9.1f}")
    print("\n".join(mem_lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32, help="model_channels (channel_mult 1, 2, 2)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--variant", choices=["pseudo3d", "full3d"], help=argparse.SUPPRESS)  # the child process
    p.add_argument("--cascade", action="store_true", help="time the cascade's stages and SR_h's memory instead")
    p.add_argument("--sizes", default="tiny,paper", help="--cascade: tiny, paper or both")
    p.add_argument("--max-frames", type=int, default=None, help="--cascade: frames timed per SR stage (CPU: 4)")
    p.add_argument("--frame-batch", type=int, default=4, help="--cascade: SR_h frames per U-Net call to compare")
    p.add_argument("--mem-size", default="tiny", choices=["tiny", "paper"], help="--cascade: SR_h size for memory")
    p.add_argument("--mem-frames", type=int, default=76, help="--cascade: frames of the clip for the memory test")
    p.add_argument("--srh-memory", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.srh_memory:
        print(json.dumps(srh_memory(args)), flush=True)
        return 0
    if args.cascade:
        return cascade_main(args)
    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return 0
    rows = []
    for variant in ("pseudo3d", "full3d"):
        cmd = [sys.executable, __file__, "--variant", variant, "--width", str(args.width), "--frames", str(args.frames),
               "--res", str(args.res), "--batch", str(args.batch), "--steps", str(args.steps)] + (["--gpu"] if args.gpu else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"U-Net width {args.width} x (1,2,2), clips {args.frames}x{args.res}^2, batch {args.batch}, "
          f"{'GPU bf16' if args.gpu else 'CPU fp32'}")
    print(f"{'variant':<10} {'params':>8} {'fwd GFLOP':>10} {'steps/s':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['variant']:<10} {r['params_M']:>7.2f}M {r['fwd_GFLOP']:>10.1f} {r['steps_per_s']:>8.3f} "
              f"{r['peak_MiB']:>9.0f}   ({r['peak_kind']})")
    a, b = rows
    print(f"full3d / pseudo3d: params x{b['params_M'] / a['params_M']:.2f}, FLOPs x{b['fwd_GFLOP'] / a['fwd_GFLOP']:.2f}, "
          f"step time x{a['steps_per_s'] / b['steps_per_s']:.2f}, peak memory x{b['peak_MiB'] / a['peak_MiB']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
