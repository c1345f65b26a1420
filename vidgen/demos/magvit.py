"""Demo stage ``magvit``: train the tiny MAGVIT transformer (CG + FP, COMMIT) on the demo tokenizer's tokens, then
sample class-conditional clips and frame-prediction clips conditioned on real footage (spec magvit.md Parts 2–3).

Writes to ``<out>/magvit/``: ``class_conditional.{png,mp4}``, ``frame_prediction.{png,mp4}`` (rows: condition
video, prediction, ground truth), ``loss.txt`` and ``magvit_tiny.pt`` (hyper-parameters + weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn


class _MemoTokenizer(nn.Module):
    """Wraps the frozen tokenizer and caches ``encode`` per clip content (the demo revisits the same batches)."""

    def __init__(self, tok: nn.Module):
        super().__init__()
        self.tok = tok
        self.arch = getattr(tok, "arch", None)
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def codebook_size(self):
        return self.tok.codebook_size

    def token_shape(self, T, H, W):
        return self.tok.token_shape(T, H, W)

    def encode(self, video):
        key = (tuple(video.shape), hash(video.detach().cpu().numpy().tobytes()))
        if key not in self._cache:
            self._cache[key] = self.tok.encode(video)
        return self._cache[key]

    def decode(self, tokens):
        return self.tok.decode(tokens)


def _batches(dm, split: str, n: int) -> list[dict]:
    it = iter(dm.train_dataloader() if split == "train" else dm.val_dataloader())
    out = []
    for _ in range(n):
        try:
            b = next(it)
        except StopIteration:
            break
        out.append({k: b[k] for k in ("video", "label")})
    return out


def run(ctx) -> dict:
    from vidgen.datamodules import VideoDataModule
    from vidgen.lightning_modules.magvit import TASKS, MaskedVideoTransformer
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer
    from vidgen.datamodules.media import save_video_grid_mp4, write_grid_png

    out = Path(ctx.out_dir) / "magvit"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = (getattr(ctx, "results", {}) or {}).get("tokenizer", {}).get("checkpoint")
    if not ckpt or not Path(ckpt).exists():
        return {"summary": "skipped: the tokenizer stage left no checkpoint (run it first)", "outputs": []}
    torch.manual_seed(ctx.seed)
    tok = VideoTokenizer.load_frozen(str(ckpt))
    T, R = int(tok.num_frames), int(tok.resolution)
    grid = tok.token_shape(T, R, R)
    manifest = json.loads((Path(ctx.data_dir) / "manifest.json").read_text())
    num_classes = int(manifest.get("num_classes", 14))
    real_label = int(manifest.get("real_footage_label", -1))
    c_frames = max(1, T // grid[0])  # one latent frame of context
    ctx.log(f"tokenizer {ckpt}: {T}x{R}^2 -> tokens {tuple(grid)}, {tok.codebook_size} codes; FP given {c_frames} "
            f"frame(s)")

    model = MaskedVideoTransformer(
        size="tiny", tasks=["CG", "FP"], multi_task=True, num_classes=num_classes, num_frames=T, resolution=R,
        condition_frames=c_frames, codebook_size=tok.codebook_size, token_shape=list(grid), dropout=0.0,
        attn_dropout=0.0, warmup_steps=0, seed=ctx.seed)
    model.attach_tokenizer(_MemoTokenizer(tok))

    dm = VideoDataModule(train_shards=str(Path(ctx.data_dir) / "train"), val_shards=str(Path(ctx.data_dir) / "val"),
                         seed=ctx.seed, num_frames=T, resolution=R, batch_size=8, num_workers=1, crop="center")
    dm.setup("fit")
    n_batches = 4 if ctx.fast else 12
    steps = 60 if ctx.fast else 300
    train = _batches(dm, "train", n_batches)
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-3, betas=(0.9, 0.96), weight_decay=0.045)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        task = model.schedule[step]
        ratio = model.commit.sample_ratio(model._step_generator(step), model.num_tokens)
        res = model.commit_loss(train[step % len(train)], task, ratio)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        losses.append(res["loss"].item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            ctx.log(f"step {step:4d} {task:3s} loss {res['loss']:.3f} (refine {res['refine']:.3f} mask "
                    f"{res['mask']:.3f} recons {res['recons']:.3f}) r={ratio:.2f}")
    dt = time.perf_counter() - t0
    (out / "loss.txt").write_text("\n".join(f"{x:.5f}" for x in losses) + "\n")
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                "tokenizer_checkpoint": str(ckpt)}, out / "magvit_tiny.pt")

    g = torch.Generator().manual_seed(ctx.seed)
    labels = torch.tensor([0, 1, 4, 9])  # square left/right, circle left, triangle right
    cg = model.generate({"label": labels}, task="CG", generator=g)
    write_grid_png(str(out / "class_conditional.png"), cg, max_frames=8)
    save_video_grid_mp4(str(out / "class_conditional.mp4"), cg, fps=8)

    val = _batches(dm, "val", 8)
    clips = [b["video"][b["label"] == real_label] for b in val]
    real = torch.cat(clips) if clips else torch.empty(0)
    source = "real footage"
    if real.shape[0] == 0:
        real, source = val[0]["video"], "demo clips (no real footage found in val)"
    real = real[:4]
    fp = model.generate({"video": real}, task="FP", generator=g)
    cond_video, _ = TASKS["FP"].condition_video(real, c_frames, model.config.pad_value)
    rows = torch.cat([cond_video, fp, real])
    write_grid_png(str(out / "frame_prediction.png"), rows, max_frames=8)
    save_video_grid_mp4(str(out / "frame_prediction.mp4"), rows, fps=8, nrow=real.shape[0])
    first, last = sum(losses[:10]) / min(10, len(losses)), sum(losses[-10:]) / min(10, len(losses))
    summary = (f"tiny MTM ({sum(p.numel() for p in model.net.parameters()) / 1e3:.0f}K params) {steps} steps in "
               f"{dt:.0f}s, loss {first:.2f} -> {last:.2f}; sampled {len(labels)} CG clips and {real.shape[0]} FP "
               f"clips from {source} in 12 steps")
    return {"summary": summary, "loss_first": first, "loss_last": last, "checkpoint": str(out / "magvit_tiny.pt"),
            "outputs": [str(out / n) for n in ("class_conditional.png", "class_conditional.mp4",
                                               "frame_prediction.png", "frame_prediction.mp4")]}
