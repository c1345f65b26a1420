"""Parity of our SEED-Voken (Open-MAGVIT2) checkpoint loading (``VideoTokenizer.load_seed_voken``) with THEIR code.

Builds tiny random instances of their video tokenizer (``improved_video_model.Encoder/Decoder`` + ``LFQ``) and image
tokenizer (``improved_model.Encoder/Decoder`` + ``LFQ``) from YOUR SEED-Voken checkout (imported at run time;
nothing of it is copied into vidgen), saves their ``state_dict`` as a Lightning checkpoint with the key names of
their ``VQModel`` (``encoder.*``, ``decoder.*``), loads it strictly with ``load_seed_voken`` and runs
encode -> quantise -> decode on the same input on both sides (float32, eval). Prints max |diff| of the encoder
latents, whether the token indices are equal, and max |diff| of the reconstructions; exits 1 past the tolerance:

    python benchmarks/seed_voken_parity.py --seed-voken /path/to/SEED-Voken      # or SEED_VOKEN_PATH=...

``tests/test_seed_voken.py`` runs the same check when ``SEED_VOKEN_PATH`` names a checkout.

What is NOT imported from the checkout, and why the maths is unchanged: their ``VQModel`` Lightning modules
(``models/video_lfqgan.py``, ``models/lfqgan.py``) import ``lightning``, ``pytorch_lightning``, ``main`` and the
GAN/LPIPS losses; they are not imported at all, so nothing is stubbed. Only the module files that hold the maths,
``modules/diffusionmodules/improved_video_model.py``, ``modules/diffusionmodules/improved_model.py``,
``modules/vqvae/lookup_free_quantize.py`` (torch + einops only) and ``modules/ema.py`` (``LitEma``: its buffers are
the ``model_ema.*`` tensors of their checkpoints; ``copy_to`` is what their ``ema_scope`` does) are executed,
unmodified, by file path. ``VQModel.encode``/``decode`` only chain ``encoder -> quantize -> decoder``
(``quant_conv`` is commented out), which ``compare`` does with the same objects; a ``torch.nn.Module`` holding
``encoder``/``decoder`` stands in for ``VQModel`` so the state-dict names are theirs. LFQ has no state-dict tensors
(its mask/codebook buffers are non-persistent).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/videopoet/tokenizer_seed_voken_tiny.yaml"
_FILES = {"video": "src/Open_MAGVIT2/modules/diffusionmodules/improved_video_model.py",
          "image": "src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py",
          "lfq": "src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py",
          "ema": "src/Open_MAGVIT2/modules/ema.py"}
TOLERANCE = 1e-4  # float32, relative to the largest |output| of their model


def find_checkout(path: str | os.PathLike | None = None) -> Path | None:
    """The SEED-Voken checkout: ``path``, else ``$SEED_VOKEN_PATH``; None when it lacks the Open-MAGVIT2 modules."""
    path = path or os.environ.get("SEED_VOKEN_PATH")
    if not path:
        return None
    root = Path(path).expanduser()
    return root if all((root / f).is_file() for f in _FILES.values()) else None


def _module(checkout: Path, key: str):
    spec = importlib.util.spec_from_file_location(f"_seed_voken_{key}", checkout / _FILES[key])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Their default init, plus noise on every tensor so GroupNorm/AdaGN affine terms and biases are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# layout name -> (their module, overrides of the tiny recipe's arch, codebook size, clip lengths)
LAYOUTS = {
    "video": ("video", {}, 1024, (9, 1)),  # configs/videopoet/tokenizer_seed_voken_tiny.yaml
    # their ucf101_lfqfan_128_L layout (ch_mult [1,2,2,4], 4 res blocks, z 18 = 2^18 codes) at ch 32
    "video_ucf101": ("video", {"channel_multipliers": [1, 2, 2, 4], "num_res_blocks": 4,
                               "temporal_downsample": [False, True, True]}, 2 ** 18, (17, 1)),
    "image": ("image", {"dims": 2, "norm_per_frame": None, "temporal_downsample": [False, False]}, 1024, (3,)),
}


def _ours(arch: dict, codebook: int, frames: int):
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer
    a = yaml.safe_load(TINY.read_text())["model"]["init_args"]
    a = {**a, "init_from": None, "inference_only": True, "num_frames": frames, "arch": {**a["arch"], **arch},
         "bottleneck": {**a["bottleneck"], "codebook_size": codebook}}
    return VideoTokenizer(**a)


def compare(checkout: Path, workdir: Path, seed: int = 0) -> dict[str, dict]:
    """Per case (``LAYOUTS`` x raw/EMA weights x clip length): latents / reconstruction max |diff| relative to their
    largest |value|, and whether the token indices are equal."""
    torch.manual_seed(seed)
    lfq_mod, ema_mod = _module(checkout, "lfq"), _module(checkout, "ema")
    results = {}
    for layout, (kind, over, codebook, clips) in LAYOUTS.items():
        ours = _ours(over, codebook, clips[0])
        arch = ours.arch
        bits = int(ours.codebook_size).bit_length() - 1
        ddconfig = dict(ch=arch.filters, out_ch=3, in_channels=3, num_res_blocks=arch.num_res_blocks, z_channels=bits,
                        ch_mult=tuple(arch.channel_multipliers), resolution=ours.resolution, double_z=False)
        mod = _module(checkout, kind)
        gen = torch.nn.Module()  # their VQModel's generator: attribute names encoder / decoder
        gen.encoder, gen.decoder = mod.Encoder(**ddconfig), mod.Decoder(**ddconfig)
        lfq = lfq_mod.LFQ(dim=bits, codebook_size=2 ** bits, sample_minimization_weight=1.0,
                          batch_maximization_weight=1.0).eval()
        _randomise(gen, seed + 1)
        ema = ema_mod.LitEma(gen)  # their EMA copy, as VQModel holds it (model_ema.<name without dots>)
        _randomise(gen, seed + 2)  # the raw weights move on; the EMA keeps the earlier ones
        sd = {**gen.state_dict(), **{f"model_ema.{k}": v for k, v in ema.state_dict().items()}}
        path = workdir / f"seed_voken_{layout}.ckpt"
        torch.save({"state_dict": sd}, path)
        gen.eval()
        for weights in ("raw", "auto"):  # auto = the EMA weights, which their ema_scope reconstructs with
            report = ours.load_seed_voken(str(path), weights=weights)
            assert report.exact, f"{layout}: strict load failed"
            ours.eval()
            if weights == "auto":
                ema.copy_to(gen)
            enc, dec = gen.encoder, gen.decoder
            for T in clips:
                x = torch.rand(2, 3, T, 32, 32, generator=torch.Generator().manual_seed(T)) * 2 - 1
                with torch.no_grad():
                    if kind == "video":
                        z_ref = enc(x)
                        (q, _, idx_ref), _ = lfq(z_ref, return_loss_breakdown=True)
                        y_ref = dec(q)
                    else:  # their image model sees each frame as an image
                        frames = [enc(x[:, :, t]) for t in range(T)]
                        z_ref = torch.stack(frames, 2)
                        outs = [lfq(f, return_loss_breakdown=True)[0] for f in frames]
                        idx_ref = torch.stack([o[2].view(x.shape[0], -1) for o in outs], 1)
                        y_ref = torch.stack([dec(o[0]) for o in outs], 2)
                    z = ours.encoder(ours._to_net(x))
                    idx = ours.encode(x)
                    y = ours.decode(idx)
                idx_ref = idx_ref.flatten().to(idx.dtype)
                results[f"{layout} {'ema' if weights == 'auto' else 'raw'} T={T}"] = {
                    "latents": ((z - z_ref).abs().max() / z_ref.abs().max()).item(),
                    "tokens_equal": bool(torch.equal(idx.flatten(), idx_ref)),
                    "tokens_differing": int((idx.flatten() != idx_ref).sum()),
                    "recon": ((y - y_ref).abs().max() / y_ref.abs().max()).item(),
                    "recon_abs": (y - y_ref).abs().max().item(),
                    "distinct_tokens": int(idx.unique().numel()),
                }
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed-voken", default=None, help="SEED-Voken checkout (default: $SEED_VOKEN_PATH)")
    p.add_argument("--workdir", default="/tmp/seed_voken_parity")
    args = p.parse_args(argv)
    checkout = find_checkout(args.seed_voken)
    if checkout is None:
        print("no SEED-Voken checkout with src/Open_MAGVIT2/modules: pass --seed-voken or set SEED_VOKEN_PATH")
        return 2
    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bad = False
    for case, r in compare(checkout, work).items():
        ok = r["latents"] <= TOLERANCE and r["tokens_equal"] and r["recon"] <= TOLERANCE
        bad |= not ok
        print(f"{case:22s} latents rel max|diff| {r['latents']:.2e}  tokens equal {r['tokens_equal']} "
              f"({r['tokens_differing']} differ, {r['distinct_tokens']} distinct)  recon rel max|diff| "
              f"{r['recon']:.2e} (abs {r['recon_abs']:.2e})  {'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
