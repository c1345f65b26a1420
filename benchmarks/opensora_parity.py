"""Parity of our STDiT3 (lightning_modules/stdit.py) with the official Open-Sora v1.2 code, on the same weights.

Builds a tiny official ``STDiT3`` from YOUR Open-Sora checkout (imported at run time; nothing of it is copied into
vidgen), randomises every weight, exports its ``state_dict``, loads it strictly into ours and runs both on the same
inputs (latents with an odd height, per-sample timesteps, two captions of different lengths with a gap in the mask,
per-sample fps, the pixel height/width of the scale rule, with and without ``x_mask``). Prints max |diff| relative
to the largest official output per case and exits 1 when a case is over the tolerance:

    python benchmarks/opensora_parity.py --opensora /path/to/Open-Sora          # float32 and float64
    python benchmarks/opensora_parity.py --opensora ... --hidden 128 --depth 2 --dtypes float32

The checkout must be v1.2 (``git checkout v1.2.0``: ``opensora/models/stdit/stdit3.py``); the official module needs
``timm``, ``einops``, ``transformers`` and ``rotary_embedding_torch`` (v1.2 pins ``timm==0.9.16``,
``rotary_embedding_torch==0.5.3``). ``tests/test_stdit.py`` runs the same check when ``OPENSORA_PATH`` points at a
checkout (or ``opensora`` is importable) and those packages are installed.

What is NOT imported from the checkout, and why the maths is unchanged (single process, float, eval):
- package ``__init__`` files (``opensora/models/__init__.py`` imports every model, VAE and text encoder): empty
  package shells point at the checkout's folders, so only ``stdit3.py``, ``layers/blocks.py`` and
  ``acceleration/{checkpoint,communications,parallel_states}.py`` (plain torch) are executed, unmodified.
- ``opensora.registry`` when mmengine is missing: a ``MODELS.register_module`` that returns the function unchanged
  (it only names the size factories); ``opensora.utils.ckpt_utils`` (colossalai): ``load_checkpoint``, used only by
  those factories with ``from_pretrained``, raises if called.
- ``xformers`` when it is not installed (CPU): ``blocks.py`` calls it only in cross-attention, as
  ``memory_efficient_attention(q, k, v, p, attn_bias=BlockDiagonalMask.from_seqlens([N] * B, y_lens))`` on packed
  ``[1, M, heads, head_dim]`` tensors. The stand-in computes exactly that: ``softmax(q k^T / sqrt(head_dim)) v`` per
  head, each query block seeing only its own key block (dropout p must be 0). It is removed from ``sys.modules``
  after the import so nothing else sees a fake xformers. Flash-attn, apex and sequence parallelism stay off (config
  defaults), so their code paths are not taken.

Why here and not ``vidgen <tool>``: like the other benchmarks it is a developer check run against an outside
environment (a foreign checkout and its pinned packages), not something a user of the package needs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
_SHELLS = ("opensora", "opensora.models", "opensora.models.layers", "opensora.models.stdit", "opensora.acceleration",
           "opensora.utils")
REQUIRED = ("einops", "timm", "transformers", "rotary_embedding_torch")


# ----------------------------------------------------------------------------------------------------------------------
# Importing the official module from a checkout
# ----------------------------------------------------------------------------------------------------------------------
def find_checkout(path: str | os.PathLike | None = None) -> Path | None:
    """The Open-Sora checkout: ``path``, else ``$OPENSORA_PATH``, else the folder above an importable ``opensora``."""
    path = path or os.environ.get("OPENSORA_PATH")
    if not path:
        package = sys.modules.get("opensora")
        try:
            spec = None if package is not None else importlib.util.find_spec("opensora")
        except (ImportError, ValueError):
            spec = None
        locations = list(getattr(package, "__path__", None) or (spec and spec.submodule_search_locations) or [])
        if not locations:
            return None
        path = Path(locations[0]).parent
    path = Path(path).expanduser().resolve()
    return path if (path / "opensora" / "models" / "stdit" / "stdit3.py").is_file() else None


def missing_requirements() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


class _BlockDiagonalMask:
    """Stand-in for ``xformers.ops.fmha.BlockDiagonalMask``: query block i attends to key block i only."""

    def __init__(self, q_seqlen: list[int], kv_seqlen: list[int]):
        if len(q_seqlen) != len(kv_seqlen):
            raise ValueError("BlockDiagonalMask: as many query blocks as key blocks")
        self.q_seqlen, self.kv_seqlen = [int(n) for n in q_seqlen], [int(n) for n in kv_seqlen]

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

    def allowed(self, device) -> torch.Tensor:
        qb = torch.repeat_interleave(torch.arange(len(self.q_seqlen)), torch.tensor(self.q_seqlen))
        kb = torch.repeat_interleave(torch.arange(len(self.kv_seqlen)), torch.tensor(self.kv_seqlen))
        return (qb[:, None] == kb[None, :]).to(device)


def _memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
    """Stand-in for ``xformers.ops.memory_efficient_attention`` on ``[B, M, heads, K]``: softmax(q k^T * scale) v."""
    if p:
        raise ValueError("the xformers stand-in has no dropout; run in eval mode")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, heads, M, K]
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_bias is not None:
        scores = scores.masked_fill(~attn_bias.allowed(scores.device), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).contiguous()  # xformers returns a contiguous [B, M, heads, K]


def import_official_stdit3(checkout: str | os.PathLike) -> types.ModuleType:
    """``opensora.models.stdit.stdit3`` from ``checkout`` (see the module docstring for what is left out)."""
    checkout = Path(checkout).resolve()
    loaded = sys.modules.get("opensora.models.stdit.stdit3")
    if loaded is not None and Path(loaded.__file__).resolve().is_relative_to(checkout):
        return loaded
    for name in [n for n in sys.modules if n == "opensora" or n.startswith("opensora.")]:
        del sys.modules[name]
    for name in _SHELLS:
        shell = types.ModuleType(name)
        shell.__path__ = [str(checkout.joinpath(*name.split(".")))]
        sys.modules[name] = shell
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, shell)
    if importlib.util.find_spec("mmengine") is None:
        registry = types.ModuleType("opensora.registry")
        registry.MODELS = types.SimpleNamespace(register_module=lambda *a, **k: (lambda fn: fn))
        sys.modules["opensora.registry"] = registry
    ckpt = types.ModuleType("opensora.utils.ckpt_utils")

    def load_checkpoint(*args, **kwargs):
        raise RuntimeError("opensora.utils.ckpt_utils is not imported by the parity check")

    ckpt.load_checkpoint = load_checkpoint
    sys.modules["opensora.utils.ckpt_utils"] = ckpt

    stand_in = importlib.util.find_spec("xformers") is None
    if stand_in:
        ops = types.ModuleType("xformers.ops")
        ops.memory_efficient_attention = _memory_efficient_attention
        ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_BlockDiagonalMask)
        xformers = types.ModuleType("xformers")
        xformers.ops = ops
        sys.modules.update({"xformers": xformers, "xformers.ops": ops})
    try:
        module = importlib.import_module("opensora.models.stdit.stdit3")
    finally:
        if stand_in:  # blocks.py keeps its reference; nothing else may mistake the stand-in for xformers
            sys.modules.pop("xformers", None)
            sys.modules.pop("xformers.ops", None)
    module.XFORMERS_STAND_IN = stand_in
    return module


# ----------------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------------
def build_pair(checkout, hidden: int = 64, depth: int = 2, heads: int = 4, caption_channels: int = 24,
               tokens: int = 7, seed: int = 0):
    """``(official, ours)``: a tiny official STDiT3 with every weight randomised (the official init zeroes the temporal
    blocks' output projections and the fps embedder's output) and our STDiT3 loaded strictly from its state dict."""
    from vidgen.lightning_modules.stdit import STDiT3, STDiT3Config

    stdit3 = import_official_stdit3(checkout)
    g = torch.Generator().manual_seed(seed)
    fields = dict(hidden_size=hidden, depth=depth, num_heads=heads, caption_channels=caption_channels,
                  model_max_length=tokens, in_channels=4, patch_size=(1, 2, 2), qk_norm=True, pred_sigma=True)
    official = stdit3.STDiT3(stdit3.STDiT3Config(**fields)).eval()
    with torch.no_grad():
        for name, p in official.named_parameters():
            if name == "rope.freqs":
                continue  # the RoPE frequencies stay the official ones
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else (0.3 if p.ndim > 1 else 0.1) * noise)
    sd = {k: v.clone() for k, v in official.state_dict().items()}
    ours = STDiT3(STDiT3Config(**fields)).eval()
    report = ours.load_pretrained(sd, strict=True)
    return official, ours, report


def make_inputs(tokens: int, caption_channels: int, seed: int = 1, x_mask: bool = False, text_mask: bool = True):
    g = torch.Generator().manual_seed(seed)
    b = 2
    inputs = dict(
        x=torch.randn(b, 4, 3, 5, 6, generator=g),  # odd latent height: padded to the patch, then cropped
        timestep=torch.tensor([37.5, 801.0]),
        y=torch.randn(b, 1, tokens, caption_channels, generator=g),
        mask=None,
        fps=torch.tensor([24.0, 8.0]),
        height=torch.tensor([40.0, 40.0]),  # pixels: the position-table scale rule gives scale != 1
        width=torch.tensor([96.0, 96.0]),
        x_mask=torch.tensor([[False, True, True], [True, True, False]]) if x_mask else None,
    )
    if text_mask:
        mask = torch.zeros(b, tokens, dtype=torch.long)
        mask[0, :3] = 1
        mask[1, [0, 2, 3, 4]] = 1  # a gap: the official code keeps exactly the tokens with mask 1
        inputs["mask"] = mask
    return inputs


CASES = {
    "text mask": dict(x_mask=False, text_mask=True),
    "text mask + x_mask": dict(x_mask=True, text_mask=True),
    "no text mask": dict(x_mask=False, text_mask=False),
    "no text mask + x_mask": dict(x_mask=True, text_mask=False),
}


def compare(checkout, dtypes=("float32", "float64"), **sizes) -> dict[tuple[str, str], float | str]:
    """max |official - ours| / max |official| per (dtype, case); a string when the official forward cannot run in that
    dtype. Both forwards return float32 whatever the weights' dtype (as the official code), so float64 weights agree
    to about one float32 rounding of the output."""
    official, ours, _ = build_pair(checkout, **sizes)
    tokens, cap = sizes.get("tokens", 7), sizes.get("caption_channels", 24)
    results: dict[tuple[str, str], float | str] = {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        official.to(dtype)
        ours.to(dtype)
        for case, kw in CASES.items():
            inputs = make_inputs(tokens, cap, **kw)
            inputs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
            with torch.no_grad():
                got = ours(**inputs)
                try:
                    want = official(**inputs)
                except Exception as err:  # e.g. a dtype the official code does not support
                    results[(dtype_name, case)] = f"official forward failed: {type(err).__name__}: {err}"
                    continue
            if got.shape != want.shape:
                results[(dtype_name, case)] = f"shapes differ: ours {tuple(got.shape)}, official {tuple(want.shape)}"
                continue
            diff = float((got.double() - want.double()).abs().max())
            results[(dtype_name, case)] = diff / float(want.double().abs().max())
    return results


#: on max |diff| / max |official output|; float64: both outputs are rounded to float32, so two float32 ulps
TOLERANCE = {"float32": 1e-5, "float64": 2.4e-7}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opensora", help="Open-Sora v1.2 checkout (default: $OPENSORA_PATH or an importable opensora)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--caption-channels", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=sorted(TOLERANCE))
    args = parser.parse_args(argv)
    checkout = find_checkout(args.opensora)
    if checkout is None:
        parser.error("no Open-Sora v1.2 checkout (opensora/models/stdit/stdit3.py): pass --opensora or set OPENSORA_PATH")
    missing = missing_requirements()
    if missing:
        parser.error(f"the official module needs {missing}: pip install them (v1.2 pins timm==0.9.16, "
                     "rotary_embedding_torch==0.5.3)")
    sys.path.insert(0, str(ROOT))
    torch.manual_seed(args.seed)
    results = compare(checkout, args.dtypes, hidden=args.hidden, depth=args.depth, heads=args.heads,
                      caption_channels=args.caption_channels, tokens=args.tokens, seed=args.seed)
    stdit3 = sys.modules["opensora.models.stdit.stdit3"]
    import timm

    print(f"official: {stdit3.__file__}  (timm {timm.__version__}, rotary_embedding_torch "
          f"{importlib.metadata.version('rotary_embedding_torch')}, xformers "
          f"{'stand-in' if stdit3.XFORMERS_STAND_IN else 'installed'})")
    print(f"size: hidden {args.hidden}, depth {args.depth}+{args.depth}, heads {args.heads}, caption channels "
          f"{args.caption_channels}, {args.tokens} tokens; latents [2, 4, 3, 5, 6]")
    bad = 0
    for (dtype_name, case), diff in results.items():
        if isinstance(diff, str):
            print(f"  {dtype_name:8s} {case:24s} {diff}")
            continue
        ok = diff <= TOLERANCE[dtype_name] and math.isfinite(diff)
        bad += not ok
        print(f"  {dtype_name:8s} {case:24s} max |diff| / max |out| = {diff:.2e}  {'ok' if ok else 'OVER ' + str(TOLERANCE[dtype_name])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
