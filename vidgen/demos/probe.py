"""Demo stage ``probe``: train the demo's video classifier (``configs/eval/probe_tiny.yaml``) on the real train clips
and measure it on the real val clips — the ceiling every generator's probe accuracy is read against (issue 10 §2).

The clips are decoded once into memory (``vidgen.demos.common.load_clips``) and training runs the recipe's model and
step count through a Lightning ``Trainer``. Returns ``checkpoint`` (read by ``report_samples`` of later stages),
``accuracy`` (per head, real val clips) and ``chance``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "eval" / "probe_tiny.yaml"


def run(ctx) -> dict:
    import lightning as L
    import yaml

    from vidgen.demos.common import last_checkpoint, load_clips, probe_scores, stage_trainer
    from vidgen.lightning_modules.probe import VideoProbe

    out = Path(ctx.out_dir) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(CONFIG.read_text())
    margs, dargs = dict(cfg["model"]["init_args"]), cfg["data"]["init_args"]
    steps = int(cfg["trainer"]["max_steps"]) // (3 if ctx.fast else 1)
    margs["total_steps"] = steps
    L.seed_everything(ctx.seed, verbose=False)
    t0 = time.perf_counter()
    train = load_clips(ctx, "train", int(dargs["num_frames"]), int(dargs["resolution"]), int(dargs["frame_stride"]))
    val = load_clips(ctx, "val", int(dargs["num_frames"]), int(dargs["resolution"]), int(dargs["frame_stride"]),
                     procedural_only=True)
    ctx.log(f"decoded {len(train['label'])} train / {len(val['label'])} procedural val clips in "
            f"{time.perf_counter() - t0:.1f}s")
    model = VideoProbe(**margs)
    bs = int(dargs["batch_size"])
    g = torch.Generator().manual_seed(ctx.seed)

    def batches():
        while True:
            perm = torch.randperm(len(train["label"]), generator=g)
            for i in range(0, len(perm) - bs + 1, bs):
                j = perm[i:i + bs]
                yield {"video": train["video"][j], "label": train["label"][j], "text": [train["text"][k] for k in j]}

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return batches()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a ~70k-parameter CNN is per-op bound: one thread is as fast and leaves a core free
    t0 = time.perf_counter()
    try:
        trainer = stage_trainer(out, max_steps=steps, limit_val_batches=0)
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(Stream(), batch_size=None))
        train_s = time.perf_counter() - t0
        ckpt = last_checkpoint(out)
        model.eval()
        scores, _ = probe_scores(model, val["video"][:, :, : model.config.num_frames], val["label"], val["text"])
        # the same clips at stride 2 (how the Latte stage samples): the ceiling should not depend on frame rate
        s2 = load_clips(ctx, "val", 2 * model.config.num_frames - 1, int(dargs["resolution"]), 1,
                        procedural_only=True)
        scores2, _ = probe_scores(model, s2["video"][:, :, ::2], s2["label"], s2["text"])
    finally:
        torch.set_num_threads(threads)
    acc = {k: v["accuracy"] for k, v in scores.items()}
    chance = {k: v["chance"] for k, v in scores.items()}
    n = next(iter(scores.values()))["n"]
    line = ", ".join(f"{k} {v * 100:.0f}%" for k, v in acc.items())
    ctx.log(f"{steps} steps in {train_s:.0f}s; real val ({n} clips): {line}; at stride 2: "
            + ", ".join(f"{k} {v['accuracy'] * 100:.0f}%" for k, v in scores2.items()))
    return {"summary": f"probe accuracy on {n} real val clips: {line} (chance class "
                       f"{chance['class'] * 100:.0f}%); {steps} steps in {train_s:.0f}s",
            "checkpoint": str(ckpt), "accuracy": acc, "accuracy_stride2": {k: v["accuracy"] for k, v in scores2.items()},
            "chance": chance, "outputs": [str(ckpt)]}
