"""Demo stage ``make_a_video``: text-to-video with NO text-video pairs in training (Make-A-Video, spec
make_a_video_videopoet.md §1.1-§1.5), on the procedural clips ("a red square moving left").

1. A tiny CLIP (open_clip ``CLIP`` + ``ClipLoss``, ``lightning_modules/clip.py``) on (frame, caption) pairs; its
   zero-shot caption->frame retrieval accuracy on val is reported.
2. The prior P on (frame, caption) pairs: CLIP text encodings -> CLIP image embedding (DALL-E 2 diffusion prior).
3. The decoder D on single frames, conditioned on the frame's own CLIP image embedding (no text).
4. D^t: temporal layers added at identity, D's weights loaded (spatial layers frozen, ``SPATIAL_LR_SCALE``), the new
   temporal/fps layers trained on 8-frame clips WITHOUT their captions,
   conditioned on the CLIP embedding of the first frame and on fps (per-clip fps drawn from a Beta distribution in
   [4, 8] with the datamodule's own ``target_fps`` / ``clip_indices`` on the cached 15-frame clips).
5. Sampling: caption -> CLIP text -> P -> y_e -> D^t (fps 4, CFG on both, stochastic DDIM) -> 8 frames at 16x16,
   every caption drawn ``DRAWS`` times
   (the base of the cascade, which the next stage, ``make_a_video_cascade``, takes to 36 x 64^2), scored by the
   demo's probe (``report_samples``): shape and colour are what a CLIP image embedding carries; direction cannot
   pass through an image embedding of one frame, which is the paper's own stated limitation (§1.1 notes), and its
   accuracy is reported as that measure.

CLIP and the prior see 32x32 frames; D and D^t generate 16x16 (DALL-E 2 likewise pairs a 224^2 CLIP with a 64^2
decoder). Each training phase runs a fixed number of steps (``STEPS``; a fifth with --fast) on cached tensors, so
results do not depend on the machine's speed; the models are tiny and the samples rough.

Measured 2026-12-02 (full run of main, then ``vidgen demo --only make_a_video`` on a copy; 2 cores shared with
three other jobs, so CPU-s are inflated ~1.4x against a quiet machine): before (D 300 steps, D^t 150 steps at
spatial lr x0.5, DDIM eta 0, CFG 3) shape 50%, colour 92%, direction 17% on the 12 prompts, 109 CPU-s; after
(D 600, D^t 100 with frozen spatial layers, DDIM eta 1, CFG 5) shape 58%, colour 92%, direction 33%, 137 CPU-s.
Where shape is lost (decomposition, same checkpoints): the probe reads shape from real val clips area-resized to
16^2 at 100% (so 16^2 is not the limit); CLIP's val-frame embeddings give the right shape by nearest train frame
90% (linear probe 80%; colour 100%); P's y_e for the 12 prompts lands on a train frame of the right shape 83% (prior
CFG 2; 73% at CFG 1, 67% at CFG 4); D^t on the TRUE y_e of 48 val clips draws the right shape 54% (35% before
this change, at its own CFG 3 / DDIM eta 0; D of this run 58%): the decoder, which draws blobs that the probe reads
as circles (squares suffer most), is the weak link. The target (shape >= 70% on the prompts) is NOT met.
Then each caption drawn 3 times (``DRAWS``, D^t at 16 DDIM steps), the same training: shape 69% (per draw 75 / 75 /
58%), colour 92% (92% every draw), direction 19%, on 36 clips, 139 CPU-s (was 141 with one draw at 20 steps, shape
58%): the one-draw figure moved by up to 17 points with the draw alone; no decoder change found that lifts shape
(see ``STEPS``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

NUM_FRAMES, RES, BASE, SRC_FRAMES = 8, 32, 16, 15  # CLIP/prior at RES^2; D, D^t (the cascade's base) at BASE^2
# training steps per phase. Measured 2026-12-02 (shape read by the probe from D's samples on the TRUE y_e of 48 val
# clips, two frames each): D at 300 steps draws coloured blobs (shape 52% DDIM eta 0 CFG 3; 46% even with an oracle
# one-hot shape/colour condition, so neither CLIP nor P was the limit), at 600 steps 67-73% (58% for the D of the
# stage run, frame 0 only). D^t with its spatial layers trained on (lr x0.5, 150 steps) did not improve them (true
# y_e of 48 val clips: D 35%, D^t 35%): the spatial budget goes to D and D^t trains its new temporal/fps layers only
# (spatial_lr_scale 0, the paper's §3.4 reading).
# Later the same day, D alone trained by a plain loop on the stage's frames and y_e, scored on the true y_e of the 48 val
# clips x 2 seeds / P's y_e of the 12 captions x 4 seeds (shape; colour 93-100% throughout; +-7 points between seeds):
# this D (batch 24, 600 steps, 79 CPU-s) 59% / 73%; batch 48 x 430 steps (same CPU-s) 62% / 71%; that + attention at
# 8^2 too + y_e scaled by sqrt(64) 60% / 77%; model_channels 24 x 400 steps (same CPU-s) 52% / 69%; CFG 2 / 5 / 9
# 62 / 62 / 57% and 73 / 71 / 69%. None of these is a clear gain: the decoder still draws blobs. Twice the steps (1200,
# ~2x the D CPU-s, over the stage's budget) 72% / 73%: more training lifts the true-y_e shape, not the captions' (P's
# y_e; "a blue triangle moving left" comes out an empty frame at every draw, which the probe happens to read as a
# triangle).
STEPS = {"clip": 200, "prior": 300, "image": 600, "video": 100}
# v-prediction for every U-Net stage of the demo (Imagen Video uses v for its whole cascade [unverified for MAV]; the
# recipes keep eps): at a few hundred steps on these clips eps-prediction samples stay noise (sample mean -0.22 vs
# the clips' -0.67, MSE 0.58 for D after 300 steps) while v-prediction gets the layout (mean -0.71, MSE 0.11).
DIFFUSION = {"predict": "v"}
# D and D^t sample with stochastic DDIM (eta 1) and CFG 5: on the same D (300 steps, true y_e of 48 val clips x 2
# frames) shape 52% (eta 0, CFG 3) -> 64% (eta 1, CFG 3); at 600 steps 65% -> 73% (eta 1, CFG 5).
DECODER_DIFFUSION = {**DIFFUSION, "eta": 1.0}
DECODER_CFG = 5.0
# The stage's measure: every caption drawn DRAWS times (its own P sample and D^t noise each draw, one batch), so the probe
# scores 36 clips instead of 12 (one caption was 8 points of accuracy), with D^t at DECODER_STEPS DDIM steps to pay
# for it. Measured 2026-12-02 on one D (bs 48, 430 steps; true y_e of the 48 val clips x 2 seeds / P's y_e of the 12
# captions x 4 seeds): DDIM 12 / 16 / 20 / 60 steps shape 56 / 59 / 62 / 64% and 67 / 71 / 71 / 69%, colour 96-100%
# throughout, so 16 steps lose nothing measurable (the spread between seeds is +-7 points at n = 48).
DRAWS = 2  # 3 in session 8 (36 clips, 18 s of sampling); 2 for the 15-minute budget (session 9)
DECODER_STEPS = 16
SPATIAL_LR_SCALE = 0.0  # D^t: 0 freezes D's spatial layers (§3.4), only the temporal/fps layers train
UNET = dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,), num_head_channels=32,
            groups=8, num_cond_tokens=2)
PROMPTS = [  # every shape x direction, colours cycling: labels for the probe, captions for colour
    ("red", "square", "left"), ("green", "square", "right"), ("blue", "square", "up"), ("yellow", "square", "down"),
    ("green", "circle", "left"), ("blue", "circle", "right"), ("yellow", "circle", "up"), ("red", "circle", "down"),
    ("blue", "triangle", "left"), ("yellow", "triangle", "right"), ("red", "triangle", "up"), ("green", "triangle", "down"),
]


def _fit(module, batches, max_steps: int, run_dir, ema: bool = False):
    """Train a LightningModule on in-memory batches for ``max_steps`` steps in the CLI's run layout under
    ``run_dir`` (final state in ``<run_dir>/checkpoints/last.ckpt``); (losses, seconds, checkpoint path)."""
    from lightning.pytorch.callbacks import Callback

    from vidgen.callbacks.ema import EMA
    from vidgen.demos.common import last_checkpoint, stage_trainer

    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    cbs = [Record()] + ([EMA(decay=0.99)] if ema else [])
    trainer = stage_trainer(run_dir, max_steps=max_steps, callbacks=cbs, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
    return losses, time.perf_counter() - t0, last_checkpoint(run_dir)


def area_resize(clips: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, T, H, W]`` -> ``[N, C, T, size, size]`` by area averaging (exact for integer factors)."""
    from einops import rearrange

    x = torch.nn.functional.interpolate(rearrange(clips, "n c t h w -> (n t) c h w"), size=(size, size), mode="area")
    return rearrange(x, "(n t) c h w -> n c t h w", n=clips.shape[0])


def _loss_line(losses: list[float]) -> str:
    k = max(1, min(20, len(losses) // 4))
    return f"{len(losses)} steps, loss {np.mean(losses[:k]):.3f} -> {np.mean(losses[-k:]):.3f}"


def _fps_clips(clips: torch.Tensor, rng: np.random.Generator, src_fps: float = 8.0):
    """(clips, fps, index of their first frame): 8-frame clips at a per-clip target fps drawn from Beta(1, 1) on
    [4, 8] through the datamodule's draw (``decode.target_fps``) and frame spacing (``decode.clip_indices``)."""
    from vidgen.datamodules.decode import ClipSpec, clip_indices, target_fps

    spec = ClipSpec(num_frames=NUM_FRAMES, fps_range=(4.0, 8.0), fps_beta=(1.0, 1.0))
    out, fps, first = [], [], []
    for v in clips:
        f = target_fps(spec, rng)
        idx = clip_indices(v.shape[1], NUM_FRAMES, src_fps / f, float(rng.random()), "loop")
        out.append(v[:, torch.from_numpy(idx)])
        fps.append(f)
        first.append(int(idx[0]))
    return torch.stack(out), torch.tensor(fps, dtype=torch.float32), torch.tensor(first)


def _per_draw(ctx, videos: torch.Tensor, labels: torch.Tensor, captions: list[str], per: int) -> list[dict]:
    """The probe's accuracy per head on each draw of the captions alone (rows ``k*per .. (k+1)*per``): the spread
    between draws is the measure's own noise. Empty without a probe."""
    from vidgen.demos.common import get_probe, probe_scores

    probe = get_probe(ctx)
    if probe is None:
        return []
    out = []
    for k in range(0, len(captions), per):
        scores, _ = probe_scores(probe, videos[k:k + per], labels[k:k + per], captions[k:k + per])
        out.append({h: round(v["accuracy"], 3) for h, v in scores.items()})
    return out


def run(ctx) -> dict:
    from vidgen.demos.common import load_clips, report_samples
    from vidgen.lightning_modules.clip import CLIP, CLIP_SIZES, retrieval_accuracy
    from vidgen.lightning_modules.make_a_video import DiffusionPrior, MakeAVideoDecoder

    out = Path(ctx.out_dir) / "make_a_video"
    out.mkdir(parents=True, exist_ok=True)
    steps = {k: max(2, int(v * (0.2 if ctx.fast else 1.0))) for k, v in STEPS.items()}
    t_stage = time.perf_counter()
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: per-op overhead dominates, one thread is fastest (restored below)
    try:
        train = load_clips(ctx, "train", SRC_FRAMES, RES, 1, procedural_only=True)
        val = load_clips(ctx, "val", SRC_FRAMES, RES, 1, procedural_only=True)
        clips, texts = train["video"], train["text"]
        n, t_src = clips.shape[0], clips.shape[2]
        ctx.log(f"{n} procedural train clips ({t_src} frames, {RES}x{RES}); captions used only for CLIP and the prior")

        # 1. tiny CLIP on (frame, caption) pairs --------------------------------------------------------------------
        clip = CLIP(model_cfg=CLIP_SIZES["tiny"], lr=2e-3, weight_decay=0.05, warmup_steps=20)
        batches = []
        for _ in range(steps["clip"]):
            i = torch.randint(0, n, (64,), generator=g)
            f = torch.randint(0, t_src, (64,), generator=g)
            batches.append({"video": clips[i, :, f], "text": [texts[j] for j in i.tolist()]})
        losses, secs, ckpt_clip = _fit(clip, batches, steps["clip"], out / "clip")
        clip.eval()
        with torch.no_grad():
            mid = val["video"][:, :, t_src // 2]
            img, txt, _ = clip.features(mid, val["text"])
        acc, chance = retrieval_accuracy(txt, img, val["text"])
        ctx.log(f"CLIP: {_loss_line(losses)} in {secs:.0f}s; zero-shot caption->frame retrieval on val "
                f"{acc:.0%} (chance {chance:.0%}, {len(val['text'])} clips)")
        clip_cfg = {"checkpoint": ckpt_clip}

        # CLIP features, computed once: image embeddings of every train frame, text conditions of every caption
        prior = DiffusionPrior(clip=clip_cfg, dim=64, depth=2, heads=2, max_text_len=12, steps=1000,
                               sample_steps=32, cfg_scale=2.0, lr=1e-3, weight_decay=0.0)
        C = prior.clip
        with torch.no_grad():
            flat = clips.permute(0, 2, 1, 3, 4).reshape(n * t_src, 3, RES, RES)
            frame_emb = torch.cat([C.encode_image(flat[k:k + 256]) for k in range(0, len(flat), 256)])
            frame_emb = frame_emb.reshape(n, t_src, -1)
            uniq = sorted(set(texts))
            tc = prior.text_conditions(uniq)
        cap_idx = torch.tensor([uniq.index(s) for s in texts])

        # 2. prior P on (frame, caption) pairs ----------------------------------------------------------------------
        batches = []
        for _ in range(steps["prior"]):
            i = torch.randint(0, n, (64,), generator=g)
            f = torch.randint(0, t_src, (64,), generator=g)
            c = cap_idx[i]
            batches.append({"image_embed": frame_emb[i, f], "text_embed": tc["text_embed"][c],
                            "text_tokens": tc["text_tokens"][c], "text_mask": tc["text_mask"][c]})
        losses, secs, ckpt_prior = _fit(prior, batches, steps["prior"], out / "prior", ema=True)
        ctx.log(f"prior: {_loss_line(losses)} in {secs:.0f}s")

        # 3. decoder D on single frames (y_e = the frame's own CLIP embedding) -----------------------------------------
        small = area_resize(clips, BASE)  # the decoder's frames (y_e still comes from the RES^2 frames)
        dec = MakeAVideoDecoder(stage="image", unet=UNET, clip=clip_cfg, num_frames=1, resolution=BASE, lr=2e-3,
                                cond_drop_prob=0.1, diffusion=DECODER_DIFFUSION)
        batches = []
        for _ in range(steps["image"]):
            i = torch.randint(0, n, (24,), generator=g)
            f = torch.randint(0, t_src, (24,), generator=g)
            batches.append({"video": small[i, :, f], "image_embed": frame_emb[i, f]})
        losses, secs, ckpt_d = _fit(dec, batches, steps["image"], out / "decoder_image", ema=True)
        ctx.log(f"D (image stage): {_loss_line(losses)} in {secs:.0f}s, "
                f"{sum(p.numel() for p in dec.unet.parameters()) / 1e6:.2f}M parameters")

        # 4. D^t: temporal layers at identity, D loaded, clips without captions, y_e of the first frame, fps -------------
        dect = MakeAVideoDecoder(stage="video", unet=UNET, clip=clip_cfg, num_frames=NUM_FRAMES, resolution=BASE,
                                 lr=2e-3, cond_drop_prob=0.1, init_from=ckpt_d, spatial_lr_scale=SPATIAL_LR_SCALE,
                                 diffusion=DECODER_DIFFUSION, prior=ckpt_prior, prior_cfg_scale=2.0,
                                 cfg_scale=DECODER_CFG, sample_steps=DECODER_STEPS, sample_fps=4.0)
        batches = []
        for _ in range(steps["video"]):
            i = torch.randint(0, n, (4,), generator=g)
            v, fps, first = _fps_clips(small[i], rng)
            batches.append({"video": v, "image_embed": frame_emb[i, first], "fps": fps})  # y_e of frame 0 of the clip
        losses, secs, ckpt_dt = _fit(dect, batches, steps["video"], out / "decoder_video", ema=True)
        new = sum(p.numel() for _, p in dect.unet.new_video_parameters())
        ctx.log(f"D^t (video stage, no captions): {_loss_line(losses)} in {secs:.0f}s; "
                f"{new / 1e6:.2f}M new temporal/fps parameters, spatial lr x{SPATIAL_LR_SCALE:g}")

        # 5. text -> P -> y_e -> D^t ---------------------------------------------------------------------------------
        from vidgen.callbacks.ema import ema_weights

        from vidgen.demo_data import class_label

        captions = [f"a {c} {s} moving {d}" for c, s, d in PROMPTS] * DRAWS  # draw k of every caption, k = 0..DRAWS-1
        labels = torch.tensor([class_label(s, d) for _, s, d in PROMPTS] * DRAWS)
        t0 = time.perf_counter()
        with ema_weights(dect):
            videos = dect.generate({"text": captions, "fps": torch.full((len(captions),), 4.0)},
                                   generator=torch.Generator().manual_seed(ctx.seed))
        ctx.log(f"sampled {len(captions)} clips ({len(PROMPTS)} captions x {DRAWS} draws; prior DDIM 32 CFG 2 -> D^t "
                f"DDIM {DECODER_STEPS} eta 1 CFG {DECODER_CFG:g}, fps 4, EMA weights) "
                f"in {time.perf_counter() - t0:.1f}s")
    finally:
        torch.set_num_threads(threads)
    rep = report_samples(ctx, "make_a_video", videos, labels=labels, captions=captions)
    per_draw = _per_draw(ctx, videos, labels, captions, len(PROMPTS))
    if per_draw:
        rep["probe_per_draw"] = per_draw
        ctx.log("probe per draw (shape / colour): " + "; ".join(
            f"{d['shape'] * 100:.0f}% / {d['colour'] * 100:.0f}%" for d in per_draw))
    res = {"summary": f"CLIP retrieval {acc:.0%} (chance {chance:.0%}); text->video with no text-video pairs: "
                      + rep.get("probe_summary", "no probe"),
           "clip_retrieval_acc": acc, "clip_retrieval_chance": chance, "checkpoint": ckpt_dt,
           "clip_checkpoint": ckpt_clip, "prior_checkpoint": ckpt_prior, "base_resolution": BASE,
           "num_frames": NUM_FRAMES, "steps": steps}
    res.update({k: v for k, v in rep.items() if k != "outputs"})
    res["outputs"] = rep.get("outputs", [])
    ctx.log(f"make_a_video stage wall time {time.perf_counter() - t_stage:.0f}s")
    return res


# ======================================================================================================================
# Stage ``make_a_video_cascade``: ↑F, SR_l^t and SR_h on top of the stage above, then the whole cascade (Eq. 1)
# ======================================================================================================================
CASCADE_FRAMES, SKIP = 16, 5  # ↑F trains on 16-frame clips at skip 5; the cascade interpolates 8 -> 36 at skip 5
CASCADE_STEPS = {"interpolation": 760, "sr_low_image": 200, "sr_low_video": 60, "sr_high": 200}  # training steps
# ↑F's recipe in the demo. Measured 2026-12-02 on the 24 held-out clips (MSE of the 12 filled frames; linear blending
# 0.0085, the floor to beat). Session 4's recipe (120 steps, masks interp/extrap/animation 0.8/0.1/0.1 at skips 2..5,
# uniform t, raw weights) 0.074; then, one change at a time on top of the previous line:
#   interpolation at skip 5 only (the demo's one task)               0.064 (300 steps), 0.048 (600)
#   + t_power 0.5 (high noise levels) + EMA 0.99                     0.048 / 0.038 / 0.032 at 200 / 300 / 450 steps
#   + replace_given                                                  ~0.002 lower each
#   + cond_fill 'linear' (blend in the masked conditioning frames)   0.024 (240 steps; not in the paper: zero fill)
#   + loss on all frames (the given ones teach the copy)             0.022 (lr 5e-3: 0.029, unstable)
#   + 6-frame clips (2 given at skip 5), 4 per step x 320 steps      0.0154-0.0158 (DDIM 4/8/16: 0.0165/0.0154/0.0159);
#     0.006 of it a per-frame colour offset; SDEdit from the blend noised to t = 333 / 249: 0.0090 / 0.0085
# Then (interp's tuning harness: run_cascade stopped after the ↑F measurement, baseline D^t; the stage itself agrees):
#   target 'residual' (diffuse clip - blend; not in the paper), v   0.0116 (colour offset 0.0014; t_power 1: 0.0113;
#                                                                    160 steps 0.0126)
#   + predict x0 for ↑F (x0 estimate 0 = the blend)                  0.0085 (offset 0.0001; DDIM 2/4/16 alike;
#                                                                    160 steps 0.0117: EMA still near D^t)
#   + lr 5e-3                                                        0.0083 (lr 1e-2: 0.0085; conditioning x5,
#                                                                    i.e. x5 lr on the zero-init input weights: 0.0084)
#   480 steps at lr 2e-3 0.0083; 960 steps (3x ↑F's training CPU): lr 2e-3 0.0052 (raw weights 0.0055; loss
#   0.066 -> 0.003, below the predict-zero 0.006), lr 5e-3 0.0197 (a drifting colour offset, 0.009): ↑F CAN learn
#   the motion, given the steps; 640 steps at lr 2e-3: 0.0081 (the gain comes between 640 and 960 steps).
# The zero-terminal-SNR fix (Lin et al. 2024) does not apply: the cosine schedule's alpha_bar_T is 2.4e-9 (signal
# sqrt 4.9e-5, vs 0.068 in the scaled-linear schedule they fix) and the sampler starts at t = T - 1 already. The
# residual/x0 ↑F removes the colour offset and matches the blend; at 320-640 steps it learns almost no motion on top of
# it (training loss ends at the predict-zero level, 0.006). The demo trains 960 steps at lr 2e-3 (session 7: ↑F beats
# linear blending, 0.0052 vs 0.0085, for ~+120 CPU-s on that day's machine). Session 9 (the 15-minute budget): 800
# steps 0.0066 vs 0.0085 (-22%; 960: -39%), 223 vs 247 stage CPU-s (0.0065-0.0075 in full runs); the demo runs 760.
INTERP = dict(frame_skips=[SKIP], masks={"interpolation": 1.0}, t_power=0.5, replace_given=True, ema=0.99,
              cond_fill="linear", loss_on="all", clip_frames=SKIP + 1, batch=4, target="residual", lr=2e-3,
              diffusion={"predict": "x0"})  # on top of DIFFUSION, for ↑F only
# ↑F trains on 8 fps clips only: the cascade conditions it on that fps rather than D^t's 4 fps x 5 = 20 (an fps value
# its embedding never saw) [not in the paper, which trains ↑F at many fps]
INTERP_FPS = 8.0
# SR_l^t / SR_h sample from the upsampled input noised to the top of the schedule's first third (sample_start 1/3)
# instead of pure noise (measured 2026-12-02, 12 captions, probe colour / shape; D^t 92% / 50%): from pure noise the
# tiny SR nets end 0.05-0.06 MSE away from the bilinear upsampling and lose colour (SR_l^t 58-67%, SR_h 50%; aug level
# 0 or 0.3 alike); two sets of SR checkpoints: from 1/2 SR_h 92% and 75%, from 1/3 92% and 92% (bilinear: 92%).
SR_START = 1 / 3
SAMPLE_STEPS = {"prior": 32, "decoder": 20, "interpolation": 8, "sr_low": 4, "sr_high": 3}
SR_UNET = dict(model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(), num_head_channels=8,
               groups=4)
INTERP_EVAL_CLIPS = 24


def _frame_batches(clips: torch.Tensor, steps: int, size: int, g: torch.Generator) -> list[dict]:
    """``steps`` batches of ``size`` random frames (as images) of random clips: the SR stages' image training."""
    n, t = clips.shape[0], clips.shape[2]
    return [{"video": clips[torch.randint(0, n, (size,), generator=g), :, torch.randint(0, t, (size,), generator=g)]}
            for _ in range(steps)]


def _side_by_side(stages: dict[str, torch.Tensor], size: int, frames: int, skip: int) -> torch.Tensor:
    """Every stage's output resized (nearest) to ``size`` and aligned to ``frames`` frames, side by side in width."""
    from einops import rearrange

    cols = []
    for v in stages.values():
        t = v.shape[2]
        idx = torch.arange(frames) if t == frames else (torch.arange(frames).float() / skip).round().long().clamp(max=t - 1)
        v = v[:, :, idx]
        x = torch.nn.functional.interpolate(rearrange(v, "b c t h w -> (b t) c h w"), size=(size, size), mode="nearest")
        cols.append(rearrange(x, "(b t) c h w -> b c t h w", b=v.shape[0]))
    return torch.cat(cols, dim=-1)


def run_cascade(ctx) -> dict:
    """↑F, SR_l^t (images, then video) and SR_h trained on the procedural clips; interpolation error of ↑F on held-out
    clips against linear blending; then the tiny cascade from the demo captions, every stage kept and probed.

    Measured 2026-12-02 on one D^t checkpoint (``--only make_a_video_cascade``): ↑F MSE 0.074 -> 0.042 (17.3 -> 19.7 dB;
    linear blending 0.0085, 26.8 dB: ↑F does not beat it, see ``INTERP``); probe shape / colour per stage D^t 50% / 92%,
    output (SR_h) 42% / 58% -> 50% / 92% (``SR_START``); 154-167 CPU-s under load (was 120). Later the same day
    (``INTERP``: cond_fill 'linear', loss on all frames, 4 x 6-frame clips x 320 steps; ↑F conditioned on 8 fps in
    the cascade) on a baseline run's D^t: ↑F MSE 0.0367 -> 0.0157 (20.4 -> 24.1 dB; linear blending 0.0085, still
    better); probe shape / colour at the output 50% / 92% before and after (direction 33% -> 17%, 12 prompts);
    stage 137 -> 122 CPU-s (shared machine). Then (``INTERP``: target 'residual', predict x0 for ↑F, lr 5e-3) on
    another baseline run's D^t: ↑F MSE 0.0158 -> 0.0083 (24.0 -> 26.8 dB; linear blending 0.0085: level with it, not
    clearly below); probe shape / colour per stage decoder / ↑F 67% / 100% unchanged, SR_l^t 67% / 100% -> 67% / 92%,
    SR_h 67% / 92% -> 58% / 92% (one caption of 12 each; at sampling seeds 1 and 2 both runs score the same at every
    stage: SR_h 67% / 92% and 58% / 92%); the same ↑F net, batch and steps, so the same cost (187 CPU-s, --jobs 1,
    shared machine; the baseline's 245 ran beside another stage). With 960 ↑F steps at lr 2e-3 (session 7's
    fresh-clone ``make demo``): ↑F MSE 0.0052 (28.9 dB) vs linear blending 0.0085 (26.8 dB), ↑F BEATS it; probe
    shape / colour per stage decoder / ↑F 75% / 100%, SR_l^t 83% / 100%, SR_h 100% / 100%; stage 288 CPU-s."""
    from vidgen.callbacks.ema import ema_weights
    from vidgen.datamodules.media import save_video_grid_mp4
    from vidgen.demo_data import class_label
    from vidgen.demos.common import get_probe, load_clips, probe_scores, report_samples
    from vidgen.lightning_modules.make_a_video import DiffusionPrior
    from vidgen.lightning_modules.make_a_video_cascade import MakeAVideoCascade
    from vidgen.lightning_modules.make_a_video_interp import MaskedFrameInterpolation, blend_given, spread_frames
    from vidgen.lightning_modules.make_a_video_sr import MakeAVideoSR

    base = (getattr(ctx, "results", {}) or {}).get("make_a_video") or {}
    need = ("checkpoint", "clip_checkpoint", "prior_checkpoint")
    if not all(base.get(k) and Path(base[k]).exists() for k in need):
        raise RuntimeError("make_a_video_cascade builds on the make_a_video stage's checkpoints: run that stage first")
    out = Path(ctx.out_dir) / "make_a_video_cascade"
    out.mkdir(parents=True, exist_ok=True)
    steps = {k: max(2, int(v * (0.2 if ctx.fast else 1.0))) for k, v in CASCADE_STEPS.items()}
    t_stage = time.perf_counter()
    torch.manual_seed(ctx.seed + 1)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clip_cfg = {"checkpoint": base["clip_checkpoint"]}
    b0 = int(base.get("base_resolution", BASE))
    try:
        # 16 frames at 64^2 (the cascade's alone: not shared on disk, 0.6 GB)
        train = load_clips(ctx, "train", CASCADE_FRAMES, 4 * b0, 1, procedural_only=True, share=False)
        val = load_clips(ctx, "val", CASCADE_FRAMES, 4 * b0, 1, procedural_only=True, max_clips=INTERP_EVAL_CLIPS,
                         share=False)
        hi = train["video"]  # 64^2: SR_h's targets
        mid, low = area_resize(hi, 2 * b0), area_resize(hi, b0)  # 32^2 (SR_l^t's targets, CLIP's input), 16^2 (base)
        n = hi.shape[0]
        clip = DiffusionPrior.from_checkpoint(base["prior_checkpoint"], clip=clip_cfg).clip
        with torch.no_grad():
            y_first = clip.encode_image(mid[:, :, 0])
            y_val = clip.encode_image(area_resize(val["video"], 2 * b0)[:, :, 0])
        ctx.log(f"{n} procedural train clips of {CASCADE_FRAMES} frames: {b0}^2 (↑F), {2 * b0}^2 (SR_l^t), "
                f"{4 * b0}^2 (SR_h)")

        # 1. ↑F: D^t + 4 zero-init input channels, fine-tuned on masked clips (INTERP) -------------------------------------
        cf, nb = INTERP["clip_frames"], INTERP["batch"]
        up = MaskedFrameInterpolation(unet=UNET, clip=clip_cfg, init_from=base["checkpoint"], num_frames=cf,
                                      resolution=b0, frame_skips=INTERP["frame_skips"], cond_drop_prob=0.0, lr=INTERP["lr"],
                                      masks=INTERP["masks"], t_power=INTERP["t_power"], cond_fill=INTERP["cond_fill"],
                                      loss_on=INTERP["loss_on"], replace_given=INTERP["replace_given"],
                                      target=INTERP["target"],
                                      sample_steps=SAMPLE_STEPS["interpolation"], sample_skip=SKIP,
                                      diffusion={**DIFFUSION, **INTERP.get("diffusion", {})})
        batches = []
        for _ in range(steps["interpolation"]):  # cf-frame windows of the 16-frame clips, at their own 8 fps
            i, s = torch.randint(0, n, (nb,), generator=g), int(torch.randint(0, CASCADE_FRAMES - cf + 1, (1,), generator=g))
            batches.append({"video": low[i, :, s:s + cf], "image_embed": y_first[i], "fps": torch.full((nb,), 8.0)})
        losses, secs, ckpt_up = _fit(up, batches, steps["interpolation"], out / "interpolation", ema=INTERP["ema"])
        ctx.log(f"↑F (from D^t, 7 input channels; skips {INTERP['frame_skips']}, masks {INTERP['masks']}, t_power "
                f"{INTERP['t_power']}, EMA {INTERP['ema']}, cond_fill {INTERP['cond_fill']}, loss on "
                f"{INTERP['loss_on']}, target {INTERP['target']}, predict {up.diffusion.predict}, lr {INTERP['lr']:g}, "
                f"{nb} x {cf}-frame clips): {_loss_line(losses)} in {secs:.0f}s")

        # ↑F against linear blending on held-out clips: keep every 5th frame of 16, fill the 12 between
        vlow = area_resize(val["video"], b0)
        kept = vlow[:, :, ::SKIP]
        t0 = time.perf_counter()
        with ema_weights(up):
            filled = up.interpolate(kept, SKIP, y_e=y_val, fps=torch.full((len(kept),), 8.0 / SKIP),
                                    generator=torch.Generator().manual_seed(ctx.seed))
        masked = torch.ones(CASCADE_FRAMES, dtype=torch.bool)
        masked[::SKIP] = False
        mse_up = float(((filled - vlow)[:, :, masked] ** 2).mean())
        mse_lin = float(((blend_given(*spread_frames(kept, SKIP)) - vlow)[:, :, masked] ** 2).mean())  # the baseline
        psnr = lambda m: 10 * np.log10(4.0 / max(m, 1e-12))  # noqa: E731 (pixels in [-1, 1])
        per_frame = [round(float(((filled - vlow)[:, :, k] ** 2).mean()), 4) for k in torch.nonzero(masked).flatten()]
        ctx.log(f"↑F interpolation error on {len(kept)} held-out clips (4 given frames -> 16, skip {SKIP}, EMA weights, "
                f"DDIM {SAMPLE_STEPS['interpolation']}): MSE {mse_up:.4f} ({psnr(mse_up):.1f} dB) vs linear blending "
                f"{mse_lin:.4f} ({psnr(mse_lin):.1f} dB) in {time.perf_counter() - t0:.0f}s; per filled frame {per_frame}")

        # 2. SR_l^t: images first (no temporal layers), then video (temporal layers at identity) ------------------------
        srl_img = MakeAVideoSR(stage="spatiotemporal", phase="image", unet=SR_UNET, scale_factor=2, resolution=2 * b0,
                               lr=3e-3, sample_steps=SAMPLE_STEPS["sr_low"], sample_start=SR_START, diffusion=DIFFUSION)
        losses, secs, ckpt_srl_img = _fit(srl_img, _frame_batches(mid, steps["sr_low_image"], 8, g), steps["sr_low_image"], out / "sr_low_image")
        ctx.log(f"SR_l^t image phase ({b0}->{2 * b0}): {_loss_line(losses)} in {secs:.0f}s")
        srl = MakeAVideoSR(stage="spatiotemporal", phase="video", unet=SR_UNET, scale_factor=2, resolution=2 * b0,
                           num_frames=8, init_from=ckpt_srl_img, lr=2e-3, sample_steps=SAMPLE_STEPS["sr_low"],
                           chunk_frames=16, chunk_overlap=4, sample_start=SR_START, diffusion=DIFFUSION)
        batches = []
        for _ in range(steps["sr_low_video"]):
            i, s = torch.randint(0, n, (2,), generator=g), int(torch.randint(0, CASCADE_FRAMES - 8 + 1, (1,), generator=g))
            batches.append({"video": mid[i, :, s:s + 8]})
        losses, secs, ckpt_srl = _fit(srl, batches, steps["sr_low_video"], out / "sr_low_video")
        ctx.log(f"SR_l^t video phase (8-frame clips): {_loss_line(losses)} in {secs:.0f}s")

        # 3. SR_h: per frame, no temporal layers ----------------------------------------------------------------------
        srh = MakeAVideoSR(stage="spatial", phase="image", unet=SR_UNET, scale_factor=2, resolution=4 * b0, lr=3e-3,
                           sample_steps=SAMPLE_STEPS["sr_high"], sample_start=SR_START, diffusion=DIFFUSION)
        losses, secs, ckpt_srh = _fit(srh, _frame_batches(hi, steps["sr_high"], 4, g), steps["sr_high"], out / "sr_high")
        ctx.log(f"SR_h ({2 * b0}->{4 * b0}, per frame): {_loss_line(losses)} in {secs:.0f}s")

        # 4. the cascade from the demo captions: P -> D^t -> ↑F -> SR_l^t -> SR_h, one generator -------------------------
        cascade = MakeAVideoCascade(decoder=base["checkpoint"], interpolation=ckpt_up, sr_low=ckpt_srl,
                                    sr_high=ckpt_srh, steps=SAMPLE_STEPS,
                                    guidance={"prior": 2.0, "decoder": 3.0, "interpolation": 1.0}, sample_fps=4.0,
                                    frame_skip=SKIP, interpolation_fps=INTERP_FPS, frame_batch=72, keep_stages=True)
        captions = [f"a {c} {s} moving {d}" for c, s, d in PROMPTS]
        labels = torch.tensor([class_label(s, d) for _, s, d in PROMPTS])
        t0 = time.perf_counter()
        res_c = cascade.run(captions, generator=torch.Generator().manual_seed(ctx.seed))
        stages = res_c["stages"]
        shapes = " -> ".join(f"{k} {tuple(v.shape[2:])}" for k, v in stages.items())
        ctx.log(f"cascade on {len(captions)} captions in {time.perf_counter() - t0:.0f}s: {shapes}")
        frames = stages["sr_high"].shape[2]
        grid = _side_by_side(stages, 4 * b0, frames, SKIP)
        mp4 = save_video_grid_mp4(str(out / "stages.mp4"), grid, fps=8, nrow=2)
        probe = get_probe(ctx)
        per_stage = {}
        if probe is not None:
            for k, v in stages.items():
                scores, _ = probe_scores(probe, v, labels, captions)
                per_stage[k] = {h: round(s["accuracy"], 3) for h, s in scores.items()}
            ctx.log("probe per stage (class / shape / colour / direction): " + "; ".join(
                f"{k} " + "/".join(f"{a * 100:.0f}%" for a in d.values()) for k, d in per_stage.items()))
    finally:
        torch.set_num_threads(threads)
    rep = report_samples(ctx, "make_a_video_cascade", stages["sr_high"], labels=labels, captions=captions)
    res = {"summary": (f"↑F interpolation MSE {mse_up:.4f} vs linear blending {mse_lin:.4f} (held-out, skip {SKIP}); "
                       f"cascade {shapes}; output: " + rep.get("probe_summary", "no probe")),
           "interp_mse": mse_up, "interp_mse_linear": mse_lin, "interp_psnr": psnr(mse_up),
           "interp_psnr_linear": psnr(mse_lin), "probe_per_stage": per_stage, "steps": steps,
           "sample_steps": SAMPLE_STEPS}
    res.update({k: v for k, v in rep.items() if k != "outputs"})
    res["outputs"] = [mp4] + rep.get("outputs", [])
    ctx.log(f"make_a_video_cascade stage wall time {time.perf_counter() - t_stage:.0f}s")
    return res
