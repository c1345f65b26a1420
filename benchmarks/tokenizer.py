"""VideoTokenizer speed: training batches/s (one batch = G step + D step, under a Lightning Trainer), peak memory,
and encode / decode clips/s, for the tiny recipe and MAGVIT-B (16x128^2), each case in a fresh process.

    python benchmarks/tokenizer.py                              # CPU: tiny (8x32^2, batch 4) and B (batch 1)
    python benchmarks/tokenizer.py --device cuda --bf16         # GPU: B at 16x128^2, batch 8, bf16-mixed
    python benchmarks/tokenizer.py --cases lfq_tiny B --b-batch 2

Peak memory: CPU = peak RSS of the case's process (ru_maxrss); CUDA = torch.cuda.max_memory_allocated.
With --perceptual the per-frame ResNet-50 perceptual loss runs with random weights (a local file written to a temp
dir), so its cost is included; the recipes need a real local weights file for the loss itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {  # name: (config, num_frames, resolution)
    "tiny": ("configs/magvit/tokenizer_ucf101_tiny.yaml", 8, 32),
    "lfq_tiny": ("configs/videopoet/tokenizer_lfq_tiny.yaml", 9, 32),
    "B": ("configs/magvit/tokenizer_ucf101.yaml", 16, 128),
    "v2": ("configs/videopoet/tokenizer_lfq.yaml", 17, 128),
}


def run_case(name: str, device: str, bf16: bool, batch: int, steps: int, warmup: int, perceptual: bool) -> dict:
    import lightning as L
    import torch
    import yaml

    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    torch.manual_seed(0)
    cfg_path, T, R = CASES[name]
    args = yaml.safe_load(open(os.path.join(ROOT, cfg_path)))["model"]["init_args"]
    args = {**args, "num_frames": T, "resolution": R, "init_from_2d": None}
    args["discriminator"] = {**args["discriminator"], "start_step": 0}
    loss = dict(args.get("loss") or {})
    if perceptual:
        import torchvision

        path = os.path.join(tempfile.mkdtemp(), "resnet50_random.pt")
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
        loss.update(perceptual_weight=0.1, perceptual_weights=path, perceptual_arch="resnet50")
    else:
        loss["perceptual_weight"] = 0.0
    args["loss"] = loss
    model = VideoTokenizer(**args)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("discriminator"))
    d_params = sum(p.numel() for p in model.discriminator.parameters())
    video = torch.rand(batch, 3, T, R, R) * 2 - 1

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return 10 ** 6

        def __getitem__(self, i):
            return {"video": video[i % batch]}

    times = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(max_steps=2 * (steps + warmup), accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if bf16 else "32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Timer()])
    trainer.fit(model, torch.utils.data.DataLoader(Clips(), batch_size=batch, num_workers=0))
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter())
    train_bps = steps / (times[-1] - times[warmup])
    train_peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None

    model = model.to(device).eval()
    video = video.to(device)
    ctx = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def rate(fn, n):
        with torch.no_grad(), ctx:
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return n * batch / (time.perf_counter() - t), out

    n = max(1, steps // 2)
    enc, tokens = rate(lambda: model.encode(video), n)
    dec, _ = rate(lambda: model.decode(tokens), n)
    peak = train_peak if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": name, "device": device, "bf16": bf16, "clip": f"{T}x{R}^2", "batch": batch,
            "G_params_M": round(n_params / 1e6, 2), "D_params_M": round(d_params / 1e6, 2),
            "train_batches_per_s": round(train_bps, 3), "train_clips_per_s": round(train_bps * batch, 2),
            "peak_mem_MiB": round(peak, 0), "encode_clips_per_s": round(enc, 2), "decode_clips_per_s": round(dec, 2),
            "token_grid": list(model.token_shape(T, R, R)), "perceptual": perceptual,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--cases", nargs="*", default=None, help=f"from {list(CASES)} (default: tiny B on CPU, B on CUDA)")
    p.add_argument("--b-batch", type=int, default=None, help="batch for the B / v2 cases (CPU 1, CUDA 8)")
    p.add_argument("--steps", type=int, default=None, help="timed batches (CPU: tiny 20, B 3; CUDA 20)")
    p.add_argument("--perceptual", action="store_true", help="include the ResNet-50 perceptual loss (random weights)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        big = a.one in ("B", "v2")
        batch = (a.b_batch or (8 if a.device == "cuda" else 1)) if big else 4
        steps = a.steps or (20 if a.device == "cuda" else 3 if big else 20)
        warmup = 3 if a.device == "cuda" else 1
        print("RESULT " + json.dumps(run_case(a.one, a.device, a.bf16, batch, steps, warmup, a.perceptual)))
        return 0
    cases = a.cases or (["tiny", "B"] if a.device == "cpu" else ["B"])
    rows = []
    for name in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--device", a.device]
        cmd += ["--bf16"] * a.bf16 + ["--perceptual"] * a.perceptual
        cmd += ["--b-batch", str(a.b_batch)] if a.b_batch else []
        cmd += ["--steps", str(a.steps)] if a.steps else []
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            print(f"{name}: FAILED\n{res.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(line[-1][7:]))
    keys = ["case", "device", "clip", "batch", "G_params_M", "D_params_M", "train_batches_per_s", "train_clips_per_s",
            "peak_mem_MiB", "encode_clips_per_s", "decode_clips_per_s", "token_grid"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
