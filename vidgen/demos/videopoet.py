"""Demo stage ``videopoet``: a tiny VideoPoet prefix LM (spec make_a_video_videopoet.md Part 2) trained on the demo
tokenizer's tokens of the procedural clips with MiniLM caption embeddings, by alternating gradient descent over the
text-to-video, image-to-video and frame-prediction groups (one task per step, every row the same length).

Then, with the KV cache: text-to-video from captions (probe: shape, colour, direction), image-to-video from real
first frames (probe: direction), frame prediction from real first frames (probe: direction), and a long video
extended from a T2V sample by re-tokenising its last frames (§2.9), at least 3x the trained clip length.

Writes ``<out>/videopoet/{t2v,i2v,fp}/samples.{npz,png,mp4}`` (through ``report_samples``), ``long_video.{mp4,png}``,
``loss.txt`` and ``videopoet_tiny.pt``.

The demo tokenizer is MAGVIT's tiny 3D-VQ (not causal; temporal factor 2), so "the first frame" of I2V is the first
latent frame (2 frames) and condition frames are re-tokenised edge-padded to the clip length (MAGVIT's FP padding);
with the causal MAGVIT-v2 tokenizer (configs/videopoet/tokenizer_lfq*.yaml) both are exact.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def run(ctx) -> dict:
    from vidgen.demos.common import (CLIP_FRAMES, CaptionTable, clip_tokens, load_clips, report_samples,
                                     skipped_without, stage_checkpoint)
    from vidgen.lightning_modules.nn.optim import cpu_multi_tensor
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer
    from vidgen.lightning_modules.videopoet import LAYOUTS, VideoPoet
    from vidgen.media import save_video_grid_mp4, write_grid_png

    out = Path(ctx.out_dir) / "videopoet"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = stage_checkpoint(ctx, "tokenizer")
    if ckpt is None:
        return skipped_without("tokenizer")
    torch.manual_seed(ctx.seed)
    tok = VideoTokenizer.load_frozen(str(ckpt))
    T, R = CLIP_FRAMES, int(tok.resolution)  # the demo's clips, not the tokenizer's training window
    grid = tuple(tok.token_shape(T, R, R))

    # ---- token "shards" in memory: every clip tokenised once, every caption embedded once (never per step)
    t0 = time.perf_counter()
    train = load_clips(ctx, "train", T, R, procedural_only=True)
    val = load_clips(ctx, "val", T, R, procedural_only=True)
    codes = clip_tokens(ctx, tok, train)
    captions = text = CaptionTable(train["text"] + val["text"])
    text_model, L_ = captions.encoder, captions.slots

    ctx.log(f"tokenised {len(codes)} clips {T}x{R}^2 -> {grid} tokens, {len(captions)} captions embedded "
            f"({L_} slots) in {time.perf_counter() - t0:.0f}s")

    model = VideoPoet(size="tiny", visual_codes=tok.codebook_size, audio_codes=16, text_dim=text_model.token_dim,
                      max_text_tokens=L_, tasks={"t2v": 2.0, "i2v": 1.0, "fp": 1.0}, condition_latents=1,
                      width=96, depth=2, heads=4, text_dropout=0.1, durations=[T], num_frames=T, resolution=R,
                      lr=2e-3, warmup_steps=20, guidance_scale=1.5, temperature=0.9, top_k=24, seed=ctx.seed)
    model.attach_tokenizer(tok)
    model.attach_text_encoder(text_model)
    # 150 (13 s) left every task at chance; 600 (session 9 run, 80 stage CPU-s): T2V shape 67% / colour 83%, I2V
    # direction 67%; 480 (72 CPU-s): shape 83%, colour 100%; 420 for the 15-minute budget
    steps = 40 if ctx.fast else 420
    bs = 8
    opt = cpu_multi_tensor(torch.optim.AdamW(model.net.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    g = torch.Generator().manual_seed(ctx.seed)
    model.train()
    losses, counts, t0 = [], {}, time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(codes), (bs,), generator=g)
        emb, ln = text([train["text"][i] for i in idx.tolist()])
        batch = {"tokens": codes[idx], "text_emb": emb, "text_len": ln, "num_frames": T}
        res = model.step_loss(batch, step)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(res["loss"].item())
        counts[res["task"]] = counts.get(res["task"], 0) + 1
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            ctx.log(f"step {step:4d} {res['task']:4s} len {int(res['length'])} loss {res['loss']:.3f} "
                    f"acc {res['acc']:.2f}")
    dt = time.perf_counter() - t0
    (out / "loss.txt").write_text("\n".join(f"{x:.5f}" for x in losses) + "\n")
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                "tokenizer_checkpoint": str(ckpt)}, out / "videopoet_tiny.pt")
    model.eval()

    # ---- sampling (§2.9): KV cache, CFG, top-k; seeded
    n = 12
    pick = torch.linspace(0, len(val["label"]) - 1, n).round().long()
    caps = [val["text"][i] for i in pick.tolist()]
    labels = val["label"][pick]
    real = val["video"][pick]
    sg = torch.Generator().manual_seed(ctx.seed + 1)
    t1 = time.perf_counter()
    emb, ln = text(caps)
    tb = {"text_emb": emb, "text_len": ln, "num_frames": T}
    t2v = model.sample("t2v", n, grid, batch=tb, generator=sg)
    vid_t2v = tok.decode(t2v["tokens"]).float().clamp(-1, 1)
    first = model.encode_condition(real[:, :, :model.condition_pixels(LAYOUTS["i2v"])], 1)
    i2v = model.sample("i2v", n, grid, batch=tb, given_tokens=first, generator=sg)
    vid_i2v = tok.decode(i2v["tokens"]).float().clamp(-1, 1)
    k = model.condition_pixels(LAYOUTS["fp"])
    cond = model.encode_condition(real[:, :, :k], model.config.condition_latents)
    fp = model.sample("fp", n, grid, batch=tb, given_tokens=cond, generator=sg)
    vid_fp = tok.decode(fp["tokens"]).float().clamp(-1, 1)
    long = model.extend_video(vid_t2v[:2], steps=3, generator=sg)  # re-tokenise the last frames, predict, repeat
    ts = time.perf_counter() - t1
    write_grid_png(str(out / "long_video.png"), long, max_frames=long.shape[2])
    save_video_grid_mp4(str(out / "long_video.mp4"), long, fps=8)

    reports = {}
    outputs = [str(out / "long_video.mp4"), str(out / "long_video.png"), str(out / "videopoet_tiny.pt")]
    for name, vids, kw in (("t2v", vid_t2v, dict(labels=labels, captions=caps)),
                           ("i2v", vid_i2v, dict(labels=labels, cond=real[:, :, :1])),
                           ("fp", vid_fp, dict(labels=labels, cond=real[:, :, :k]))):
        rep = report_samples(ctx, f"videopoet/{name}", vids, **kw)
        reports[name] = rep
        outputs += rep.get("outputs", [])

    def acc(name, head):
        p = reports[name].get("probe", {}).get(head)
        return "n/a" if p is None else f"{p['accuracy'] * 100:.0f}% (chance {p['chance'] * 100:.0f}%)"

    first_l, last_l = sum(losses[:10]) / min(10, len(losses)), sum(losses[-10:]) / min(10, len(losses))
    summary = (f"tiny prefix LM ({sum(p.numel() for p in model.net.parameters()) / 1e6:.1f}M) {steps} AGD steps "
               f"{counts} in {dt:.0f}s, loss {first_l:.2f} -> {last_l:.2f}; sampling {ts:.0f}s (KV cache, CFG 1.5); "
               f"T2V shape {acc('t2v', 'shape')}, colour {acc('t2v', 'colour')}, direction {acc('t2v', 'direction')}; "
               f"I2V direction {acc('i2v', 'direction')}; FP direction {acc('fp', 'direction')}; long video "
               f"{long.shape[2]} frames = {long.shape[2] / T:.1f}x the trained {T}")
    res = {"summary": summary, "loss_first": first_l, "loss_last": last_l, "long_video_frames": int(long.shape[2]),
           "probe": {k: v.get("probe") for k, v in reports.items()}, "outputs": outputs}
    return res
