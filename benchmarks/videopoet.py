"""VideoPoet prefix LM (spec make_a_video_videopoet.md §2.7, §2.9): training tokens/s with length grouping (AGD:
one task group per step, no padding) vs naive padding (tasks mixed inside a batch, padded to the longest row), and
sampling tokens/s with and without the KV cache. Printed side by side as ratios.

CPU (default; a small model so it runs on a laptop; numbers on a shared machine are inflated by contention):

    python benchmarks/videopoet.py
    python benchmarks/videopoet.py --width 256 --depth 4 --steps 5

The mixture is the paper's: text-to-image rows (1 latent frame) and text-to-video / frame-prediction rows
(``--frames`` latent frames) with 5x more images than videos per grouped batch (§2.7); "useful tokens" are the
non-padding tokens, so both arms are charged for the same work.

GPU (``--gpu``): the 1B configuration (``VIDEOPOET_SIZES``) under FSDP2 (``vidgen.parallel.apply_fsdp2``: bf16
parameters/compute, fp32 reduction, activation checkpointing of every block), one T2V group at the paper's lengths
(64 text slots, 5x16x16 = 1280 video tokens); reports tokens/s, MFU (model FLOPs = 3 x forward FLOPs from
``FlopCounterMode``, over the GPU's bf16 dense peak) and peak memory:

    python benchmarks/videopoet.py --gpu --size 1B --batch 8

Super-resolution transformer (``--sr``, spec §2.8): training steps/s and memory of the same SR model (same
parameters) with the paper's local-window attention (three axis windows + windowed LR cross-attention) vs full
attention over every token, side by side. CPU: a (5, 28, 16) token grid with the stage-1 window shapes scaled to it;
memory = the bytes autograd saves for backward, plus the attention-score elements a materialised softmax would hold
(SDPA's fused kernels do not materialise them, the math kernel does). GPU (``--sr --gpu``): the stage-1 grid
(5, 56, 32) and windows of the table, bf16 autocast, peak CUDA memory:

    python benchmarks/videopoet.py --sr
    python benchmarks/videopoet.py --sr --gpu --sr-width 1024 --sr-depth 2 --batch 4
Audio tokenizer (``--audio``, issue #16): SoundStream encode and decode real-time factors (seconds of compute per
second of audio; < 1 is faster than real time) for the paper's 16 kHz codec and the tiny 8 kHz one, on a
2.125 s clip (VideoPoet's clip length), one clip and a batch, side by side; ``--audio-device cuda`` on a GPU:

    python benchmarks/videopoet.py --audio
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import peak_tflops, timed_steps  # noqa: E402


def build(args, device="cpu"):
    import torch

    from vidgen.lightning_modules.videopoet import VideoPoet

    torch.manual_seed(0)
    kw = dict(size=args.size) if args.size else dict(size="tiny", width=args.width, depth=args.depth, heads=args.heads)
    m = VideoPoet(**kw, visual_codes=args.codes, text_dim=args.text_dim, max_text_tokens=args.text_tokens,
                  tasks={"t2i": 1.0, "t2v": 1.0, "fp": 1.0}, text_dropout=0.0, condition_latents=1)
    return m.to(device)


def rows(m, args, task: str, n: int, g):
    """``n`` packed rows of ``task`` (random codes, random caption lengths)."""
    import torch

    from vidgen.lightning_modules.videopoet import LAYOUTS, build_sequences, cut_parts

    t = 1 if task == "t2i" else args.frames
    codes = torch.randint(0, args.codes, (n, t, args.grid, args.grid), generator=g)
    parts = cut_parts(LAYOUTS[task], m.vocab, codes, condition_latents=1)
    ln = torch.randint(4, args.text_tokens + 1, (n,), generator=g)
    return build_sequences(LAYOUTS[task], m.vocab, parts, n, ln, args.text_tokens)


def padded_loss(m, seqs, text):
    """Naive padding: rows of different tasks right-padded to the longest; per-row prefix; masked loss."""
    import torch
    import torch.nn.functional as F

    n_max = max(s.length for s in seqs)
    toks, valid, lmask, plen = [], [], [], []
    for s in seqs:
        pad = n_max - s.length
        toks.append(F.pad(s.tokens, (0, pad)))
        valid.append(F.pad(s.key_valid, (0, pad)))
        lmask.append(F.pad(s.loss_mask, (0, pad))[None].expand(s.tokens.shape[0], -1))
        plen.append(torch.full((s.tokens.shape[0],), s.prefix_len))
    toks, valid, lmask, plen = torch.cat(toks), torch.cat(valid), torch.cat(lmask), torch.cat(plen)
    start = seqs[0].text_span[0]
    logits = m.net(toks, plen, valid, text[: toks.shape[0]], start)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), toks[:, 1:].flatten(), reduction="none")
    keep = lmask[:, 1:].flatten().float()
    return (ce * keep).sum() / keep.sum(), int(valid.sum()), toks.numel()


def cpu_main(args):
    import torch

    from vidgen.lightning_modules.videopoet import GroupSampler

    torch.set_num_threads(args.threads)
    m = build(args)
    opt = torch.optim.AdamW(m.net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    weights = {"t2i": 0.5, "t2v": 0.3, "fp": 0.2}
    bs = {"t2i": 5 * args.batch, "t2v": args.batch, "fp": args.batch}
    sampler = GroupSampler(weights, 0)
    text = torch.randn(5 * args.batch * 3, args.text_tokens, args.text_dim)

    def grouped(step):
        task = sampler.group_at(step)
        s = rows(m, args, task, bs[task], g)
        loss, _ = m.lm_loss(s, text[: s.tokens.shape[0]])
        return loss, int(s.key_valid.sum()), s.tokens.numel()

    def naive(step):
        # the same mixture drawn per row; a batch holds as many tokens as an average grouped batch
        per = {k: 0 for k in weights}
        rng = torch.Generator().manual_seed(step)
        n_rows = round(sum(weights[k] * bs[k] for k in weights))
        for _ in range(n_rows):
            u = float(torch.rand((), generator=rng))
            k = "t2i" if u < 0.5 else ("t2v" if u < 0.8 else "fp")
            per[k] += 1
        seqs = [rows(m, args, k, c, g) for k, c in per.items() if c]
        return padded_loss(m, seqs, text)

    res = {}
    for name, fn in (("grouped (AGD)", grouped), ("naive padding", naive)):
        for s in range(args.warmup):
            loss, _, _ = fn(10_000 + s)
            opt.zero_grad(); loss.backward(); opt.step()
        useful = total = 0
        t0 = time.perf_counter()
        for s in range(args.steps):
            loss, u, tot = fn(s)
            opt.zero_grad(); loss.backward(); opt.step()
            useful += u
            total += tot
        dt = time.perf_counter() - t0
        res[name] = (useful / dt, 1 - useful / total)
        print(f"train {name:14s}: {useful / dt:9.0f} useful tokens/s, padding (incl. unused text slots) "
              f"{(1 - useful / total) * 100:5.1f}%", flush=True)
    print(f"  grouping speed-up: {res['grouped (AGD)'][0] / res['naive padding'][0]:.2f}x")

    m.eval()
    n = args.sample_batch
    emb = torch.randn(n, args.text_tokens, args.text_dim)
    ln = torch.full((n,), args.text_tokens)
    grid = (args.sample_frames, args.grid, args.grid)
    out = {}
    for kv in (True, False):
        t0 = time.perf_counter()
        m.sample("t2v", n, grid, batch={"text_emb": emb, "text_len": ln}, generator=torch.Generator().manual_seed(0),
                 use_kv_cache=kv, guidance_scale=1.0)
        dt = time.perf_counter() - t0
        ntok = n * (args.sample_frames * args.grid ** 2 + 3)
        out[kv] = ntok / dt
        print(f"sample {'with' if kv else 'without'} KV cache: {ntok / dt:8.1f} tokens/s ({ntok} tokens in {dt:.1f}s)",
              flush=True)
    print(f"  KV-cache speed-up: {out[True] / out[False]:.1f}x")


def gpu_main(args):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.flop_counter import FlopCounterMode

    from vidgen.lightning_modules.videopoet import VideoPoet
    from vidgen.parallel import apply_fsdp2, mixed_precision_policy

    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29519")):
        os.environ.setdefault(k, v)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (use --device cpu for a gloo smoke run of the same code path)")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    with torch.device(device):
        m = build(args, device)
    g = torch.Generator().manual_seed(0)
    s = rows(m, args, "t2v", args.batch, g)
    s.tokens, s.key_valid, s.loss_mask = s.tokens.to(device), s.key_valid.to(device), s.loss_mask.to(device)
    text = torch.randn(args.batch, args.text_tokens, args.text_dim, device=device)
    params = sum(p.numel() for p in m.net.parameters())
    with torch.autocast(device.type, dtype=torch.bfloat16), FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            m.lm_loss(s, text)
    model_flops = 3 * fc.get_total_flops()
    apply_fsdp2(m.net, VideoPoet.fsdp_block_classes, init_device_mesh(device.type, (world,)),
                mp_policy=mixed_precision_policy("bf16"), activation_checkpointing=True)
    opt = torch.optim.AdamW(m.net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = m.lm_loss(s, text)
        loss.backward()
        opt.step()
        return loss

    dt, loss, mem = timed_steps(step, args.warmup, args.steps, cuda)
    if rank == 0:
        name, peak = peak_tflops(device)
        name = name if cuda else "cpu (gloo smoke run)"
        mfu = model_flops / dt / (peak * 1e12) if peak else float("nan")
        ntok = s.tokens.numel()
        print(f"VideoPoet-{args.size} LM {params / 1e6:.0f}M params, T2V rows of {s.length} tokens x batch "
              f"{args.batch}/GPU x {world} GPU(s), FSDP2 bf16 + activation checkpointing, {name}")
        print(f"  {ntok * world / dt:.0f} tokens/s ({dt * 1000:.0f} ms/step), model {model_flops / 1e12:.2f} "
              f"TFLOP/step/GPU, MFU {mfu * 100:.1f}% (peak {peak} TFLOP/s), peak memory "
              f"{mem:.1f} GiB, "
              f"loss {float(loss.detach()):.3f}")
    dist.destroy_process_group()


def sr_main(args):
    """§2.8 SR transformer: windowed vs full attention at equal size (steps/s, memory), printed as ratios."""
    import math

    import torch

    from vidgen.lightning_modules.nn.attention import Windows
    from vidgen.lightning_modules.videopoet_sr import AXES, WINDOWS, SRTransformer, SRTransformerConfig, lr_window

    gpu = args.gpu
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and not torch.cuda.is_available():
        sys.exit("--sr --gpu needs CUDA")
    if not gpu:
        torch.set_num_threads(args.threads)
    if gpu:
        grid, windows = (5, 56, 32), WINDOWS["stage1"]
    else:  # the stage-1 window shapes on a half-size grid: whole axis x 1/8, 1/7 x whole axis, all frames x 4 x 4
        grid, windows = (5, 28, 16), {"vertical": (1, 28, 2), "horizontal": (1, 4, 16), "temporal": (5, 4, 4)}
    bits, batch = 18, args.batch
    n_tok, lr_grid = math.prod(grid), (grid[0], grid[1] // 2, grid[2] // 2)
    print(f"SR transformer: grid {grid} ({n_tok} tokens), LR {lr_grid}, width {args.sr_width}, {args.sr_depth} blocks "
          f"x 3 layers, batch {batch}, {device}{' bf16 autocast' if gpu else ''}", flush=True)

    def scores(kind):
        """Attention-score elements per sample, summed over layers (self + LR cross), per head."""
        tot = 0
        for axis in AXES:
            if kind == "full":
                tot += n_tok * n_tok + n_tok * math.prod(lr_grid)
            else:
                w = Windows(grid, windows[axis])
                tot += w.num_windows * (math.prod(w.window) ** 2 + math.prod(w.window) * math.prod(lr_window(w.window)))
        return tot * args.sr_depth

    from vidgen.lightning_modules.nn.attention import attention_backend

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2 ** bits, (batch, n_tok), generator=g).to(device)
    lr = torch.randint(0, 2 ** bits, (batch, math.prod(lr_grid)), generator=g).to(device)
    text = torch.randn(batch, args.text_tokens, args.text_dim, generator=g).to(device)
    masked = torch.rand(batch, n_tok, generator=g).to(device) < 0.5
    arms = {}
    for kind in ("window", "full"):
        torch.manual_seed(0)
        cfg = SRTransformerConfig(bits=bits, grid=grid, windows=windows, width=args.sr_width, depth=args.sr_depth,
                                  heads=args.sr_heads, text_dim=args.text_dim, attention=kind)
        net = SRTransformer(cfg).to(device)
        arms[kind] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4))

    def step(kind, saved=None):
        net, opt = arms[kind]
        inputs = torch.where(masked, net.fact.mask_id, tokens)
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t) if saved is not None else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            if hooks is None:
                logits = net(inputs, lr, text)
            else:
                with hooks:
                    logits = net(inputs, lr, text)
        sub = net.fact.split(tokens)
        loss = sum(torch.nn.functional.cross_entropy(lg[masked].float(), sub[masked][:, j])
                   for j, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    saved = {}
    for kind in arms:
        for backend in ("sdpa", "math"):   # math materialises the softmax: the memory an unfused kernel needs
            if gpu and backend == "math":
                continue
            saved[kind, backend] = []
            with attention_backend(backend):
                step(kind, saved[kind, backend])
        for _ in range(args.warmup):
            step(kind)
    times = {k: [] for k in arms}
    peak = {}
    for _ in range(args.rounds):   # interleaved rounds: contention on a shared machine hits both arms alike
        for kind in arms:
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(kind)
            if gpu:
                torch.cuda.synchronize()
                peak[kind] = torch.cuda.max_memory_allocated() / 2 ** 30
            times[kind].append(args.steps / (time.perf_counter() - t0))
    res = {}
    for kind, (net, _) in arms.items():
        sps = sorted(times[kind])[len(times[kind]) // 2]
        mib = {b: sum(v) / 2 ** 20 for (k, b), v in saved.items() if k == kind}
        res[kind] = (sps, mib, scores(kind), peak.get(kind))
        mem = ", ".join(f"saved activations ({b}) {v:8.1f} MiB" for b, v in mib.items())
        print(f"  {kind:6s} attention: {sps:7.2f} steps/s (median of {args.rounds}), "
              f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params, {mem}, attention scores "
              f"{scores(kind) / 1e6:8.2f}M per sample per head" + (f", peak CUDA memory {peak[kind]:.2f} GiB" if gpu else ""),
              flush=True)
    w, f = res["window"], res["full"]
    ratios = ", ".join(f"{w[1][b] / f[1][b]:.2f}x saved activations ({b})" for b in w[1])
    print(f"  windowed / full: {w[0] / f[0]:.2f}x steps/s, {ratios}, {w[2] / f[2]:.4f}x attention-score elements"
          + (f", {w[3] / f[3]:.2f}x peak CUDA memory" if gpu else ""))
def audio_main(args):
    """Real-time factors of SoundStream encode (waveform → RVQ codes) and decode (codes → waveform)."""
    import torch

    from vidgen.lightning_modules.soundstream import SoundStream

    torch.set_num_threads(args.threads)
    device = torch.device(args.audio_device)
    print(f"SoundStream real-time factor (compute s / audio s; lower is faster), {args.audio_seconds} s clips, "
          f"{device}, {args.threads} thread(s); shared machines inflate CPU numbers")
    print(f"{'size':>5} {'rate':>6} {'batch':>5} {'frames':>6} {'encode RTF':>11} {'decode RTF':>11} "
          f"{'enc x-realtime':>15} {'dec x-realtime':>15}")
    for size in args.audio_sizes.split(","):
        torch.manual_seed(0)
        m = SoundStream(size=size, inference_only=True).to(device).eval()
        for b in (1, args.audio_batch):
            x = torch.randn(b, 1, int(args.audio_seconds * m.sample_rate), device=device) * 0.1

            def timed(fn):
                for _ in range(args.warmup):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                return sorted(times)[len(times) // 2]

            codes = m.encode(x)
            te, td = timed(lambda: m.encode(x)), timed(lambda: m.decode(codes))
            audio_s = b * args.audio_seconds
            print(f"{size:>5} {m.sample_rate:>6} {b:>5} {codes.shape[-1]:>6} {te / audio_s:>11.4f} "
                  f"{td / audio_s:>11.4f} {audio_s / te:>14.1f}x {audio_s / td:>14.1f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="FSDP2 bf16 path (default size 1B)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="--gpu only: cpu = gloo smoke run")
    p.add_argument("--size", default=None, help="a VIDEOPOET_SIZES row (300M/1B/8B); default: a small custom model")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=16)
    p.add_argument("--grid", type=int, default=8, help="latent h = w")
    p.add_argument("--frames", type=int, default=3, help="latent frames of a video")
    p.add_argument("--batch", type=int, default=2, help="videos per grouped batch (images: 5x)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-batch", type=int, default=2)
    p.add_argument("--sample-frames", type=int, default=2)
    p.add_argument("--sr", action="store_true", help="the SR transformer: windowed vs full attention (§2.8)")
    p.add_argument("--sr-width", type=int, default=128)
    p.add_argument("--sr-depth", type=int, default=1, help="SR blocks (of three layers)")
    p.add_argument("--sr-heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="--sr: interleaved timing rounds per arm (median)")
    p.add_argument("--audio", action="store_true", help="SoundStream encode/decode real-time factors instead")
    p.add_argument("--audio-sizes", default="16k,tiny", help="SOUNDSTREAM_SIZES rows, comma-separated")
    p.add_argument("--audio-seconds", type=float, default=2.125)
    p.add_argument("--audio-batch", type=int, default=8)
    p.add_argument("--audio-device", default="cpu")
    args = p.parse_args(argv)
    if args.audio:
        return audio_main(args)
    if args.sr:
        return sr_main(args)
    if args.gpu:
        args.size = args.size or "1B"
        if args.size != "tiny":
            args.codes, args.text_dim, args.text_tokens, args.grid, args.frames = 262144, 2048, 64, 16, 5
            args.batch = args.batch if args.batch != 2 else 8
            args.steps, args.warmup = max(args.steps, 10), max(args.warmup, 3)
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
