"""`vidgen tokenize`: encode video shards into token (VQ/LFQ) or latent (KL/plain AE) shards with a frozen tokenizer.

Input samples are decoded exactly as ``VideoDataModule`` decodes evaluation data (``vidgen.datamodules.decode``: deterministic
clip start, short side resized, centre crop, no flip; stills give T = 1), each sample exactly once (DataLoader workers
take whole shards; the datamodule's eval loader fills its last batch by wrapping around, which suits metrics but not
a one-to-one conversion).  Undecodable samples are skipped and counted.
Each output sample is ``{key}.npy`` (tokens ``[T', H', W']`` as int16/int32, or latents ``[C, T', H', W']`` as
float16/float32) plus the input's ``{key}.txt`` / ``{key}.cls`` copied and its ``{key}.json`` extended with a
``"tokenizer"`` entry (checkpoint, kind, shape, codebook size).  Shards are ``{tokens|latents}-{000000}.tar`` beside an
``index.json`` (DEVELOPERS.md format) that also records the tokenizer.

    vidgen tokenize --checkpoint runs/tokenizer_ucf101_tiny/checkpoints/last.ckpt \\
        --shards data/demo/train --out data/demo_tokens/train --batch-size 8

Cached text embeddings (VideoPoet §2.2, trained from token shards without re-encoding anything per step):
``--text-encoder minilm|hf|open_clip`` (``--text-encoder-path`` a LOCAL directory/file, e.g. T5-XL) adds
``{key}.text.npy`` (float16 ``[max_text_tokens, D]``, zero-padded) and ``"text_len"`` in the json. Input shards that
already hold tokens (a previous ``vidgen tokenize`` output) pass their ``.npy`` (and ``.audio.npy``) through unchanged
and only get what is missing, so ``--checkpoint`` is needed only when the input holds videos/images.

Audio tokens (VideoPoet §2.2): ``--audio-checkpoint`` (a ``SoundStream`` checkpoint) adds ``{key}.audio.npy``, the RVQ
codes ``[levels, frames]`` (int16) of the soundtrack of exactly the clip that was tokenised (same start and
duration, ``datamodules.decode.audio_window``), resampled to the codec's rate; row-major, so flattening gives the
level-major order VideoPoet's sequences use (all level-1 codes, then level 2, ...). Clips without a soundtrack get
no audio member (their count is ``audio_tokenizer.clips_without_audio`` in the index), or with ``--audio-required``
are skipped. ``--fps`` fixes every clip's duration (num_frames / fps),
so every clip gets the same number of audio frames.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch


class TokenizeError(ValueError):
    """Bad options for `vidgen tokenize` (the message names the fix)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidgen tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="VideoTokenizer training checkpoint (EMA weights are used); needed unless the input shards "
                        "already hold tokens")
    p.add_argument("--shards", required=True, help="input shards: directory, brace pattern, glob or .tar")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--num-frames", type=int, default=None, help="clip length (default: the tokenizer's)")
    p.add_argument("--resolution", type=int, default=None, help="square clip size (default: the tokenizer's)")
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--fps", type=float, default=None,
                   help="target clip fps (overrides --frame-stride where the source fps is known)")
    p.add_argument("--audio-checkpoint", default=None,
                   help="SoundStream checkpoint: also write the clip's audio tokens as {key}.audio.npy")
    p.add_argument("--audio-required", action="store_true",
                   help="with --audio-checkpoint: skip clips without a soundtrack (counted as no_audio), so every "
                        "sample has audio tokens (v2a/a2v-only training)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--latents", choices=("mean", "sample"), default="mean",
                   help="KL tokenizers: posterior mean or a sample")
    p.add_argument("--float16", action="store_true", help="store continuous latents as float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing output shards")
    p.add_argument("--text-encoder", choices=("none", "minilm", "hf", "open_clip"), default="none",
                   help="cache caption embeddings as {key}.text.npy (VideoPoet: hf with a local T5-XL directory)")
    p.add_argument("--text-encoder-path", default=None, help="local weights for --text-encoder hf/open_clip")
    p.add_argument("--max-text-tokens", type=int, default=64, help="text slots kept per caption (VideoPoet: 64)")
    return p


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class _ShardClips(torch.utils.data.IterableDataset):
    """Every sample of ``urls`` once, decoded for evaluation; DataLoader workers split the shards."""

    def __init__(self, urls: list[str], spec):
        self.urls, self.spec = urls, spec

    def __iter__(self):
        from vidgen.datamodules import tario
        from vidgen.datamodules.decode import SkipSample, decode_sample

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[wid::n]:
            if tario.is_remote(url):
                items = tario.iter_stream(url)
            else:
                listing = tario.scan_local(url)
                items = ((ref.key, tario.read_sample(url, ref)) for ref in listing.samples)
            for key, raw in items:
                keep = {e: raw[e] for e in ("txt", "cls", "json", "npy", "audio.npy", "text.npy") if e in raw}
                try:
                    sample = decode_sample(key, raw, self.spec, None)
                except SkipSample as e:
                    yield {"key": key, "skip": e.reason}
                    continue
                sample["members"] = keep
                yield sample


def _members(sample: dict, info: dict) -> dict[str, bytes]:
    """txt/cls copied; json extended with the tokenizer entry (created from the decoded fields when absent)."""
    raw = sample["members"]
    out = {e: raw[e] for e in ("txt", "cls", "audio.npy") if e in raw}
    meta: object = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    else:
        meta = {"fps": sample["fps"], "label": sample["label"]}
    if not isinstance(meta, dict):
        meta = {"source_meta": meta}
    if info is not None:
        meta["tokenizer"] = info
    if "text_len" in sample:
        meta["text_len"] = int(sample["text_len"])
    out["json"] = json.dumps(meta).encode("utf-8")
    return out


def _text_member(sample: dict) -> dict[str, bytes]:
    return {"text.npy": sample["members"]["text.npy"]} if "text.npy" in sample["members"] else {}


def _audio_tokens(group: list[dict], codec, info: dict | None) -> list[dict[str, bytes]]:
    """Per sample of ``group``: ``{"audio.npy": int16 codes [levels, frames]}`` of its clip's soundtrack, or ``{}``
    (no codec, or no soundtrack: counted in ``info["clips_without_audio"]``). Clips of one length are encoded
    together."""
    out: list[dict[str, bytes]] = [{} for _ in group]
    if codec is None:
        return out
    by_len: dict[int, list[int]] = {}
    for i, smp in enumerate(group):
        if smp.get("has_audio"):
            by_len.setdefault(int(smp["audio"].shape[-1]), []).append(i)
        else:
            info["clips_without_audio"] += 1
    for rows in by_len.values():
        with torch.no_grad():
            codes = codec.encode(torch.stack([group[i]["audio"] for i in rows])).cpu()
        for j, i in enumerate(rows):
            out[i] = {"audio.npy": _npy(codes[j].numpy().astype(np.int16))}
    return out


def _text_encoder(args: argparse.Namespace):
    """The frozen text encoder of ``--text-encoder`` (None for "none"); local weights only."""
    if args.text_encoder == "none":
        return None
    from vidgen.lightning_modules.nn.text_encoders import build_text_encoder

    if args.text_encoder in ("hf",) and not args.text_encoder_path:
        raise TokenizeError("--text-encoder hf needs --text-encoder-path (a LOCAL transformers directory, e.g. T5-XL)")
    kw: dict = {"kind": args.text_encoder}
    if args.text_encoder == "hf":
        kw["path"] = args.text_encoder_path
    elif args.text_encoder == "open_clip":
        kw["checkpoint"] = args.text_encoder_path
    return build_text_encoder(kw)


def _add_text(samples: list[dict], encoder, max_tokens: int, device) -> None:
    """Caption embeddings ``[max_tokens, D]`` float16 (zero-padded) and their valid length, per sample."""
    if encoder is None or not samples:
        return
    with torch.no_grad():
        enc = encoder.to(device)([s.get("text") or "" for s in samples])
    emb, mask = enc.tokens[:, :max_tokens].float().cpu(), enc.mask[:, :max_tokens].cpu()
    for i, s in enumerate(samples):
        arr = np.zeros((max_tokens, emb.shape[-1]), dtype=np.float16)
        n = int(mask[i].sum())
        arr[: emb.shape[1]] = (emb[i] * mask[i, :, None]).numpy().astype(np.float16)
        s["members"]["text.npy"] = _npy(arr)
        s["text_len"] = n


def main(argv: list[str] | None = None) -> int:
    from vidgen.lightning_modules.nn.conv3d import ConfigError

    try:
        return _run(build_parser().parse_args(argv))
    except (TokenizeError, ConfigError) as e:
        print(f"vidgen tokenize: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from vidgen.datamodules.decode import ClipSpec, to_float
    from vidgen.datamodules.tario import expand_shards, make_index, write_index
    from vidgen.shards import ShardWriter
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    if args.samples_per_shard < 1 or args.batch_size < 1:
        raise TokenizeError("--samples-per-shard and --batch-size must be >= 1")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise TokenizeError(f"--checkpoint {args.checkpoint!r} is not a file")
    if args.audio_checkpoint is not None and not os.path.isfile(args.audio_checkpoint):
        raise TokenizeError(f"--audio-checkpoint {args.audio_checkpoint!r} is not a file")
    if args.audio_checkpoint is not None and args.checkpoint is None:
        raise TokenizeError("--audio-checkpoint tokenises the soundtracks of the clips --checkpoint tokenises: give "
                            "both")
    if args.checkpoint is None and args.text_encoder == "none":
        raise TokenizeError("nothing to write: give --checkpoint (tokenise videos) and/or --text-encoder (cache "
                            "caption embeddings of token shards)")
    if not 1 <= args.max_text_tokens <= 512:
        raise TokenizeError(f"--max-text-tokens must be in [1, 512], got {args.max_text_tokens}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    text_encoder = _text_encoder(args)
    tok, info = None, None
    num_frames, resolution, discrete, kind = args.num_frames or 1, args.resolution or 1, True, "tokens"
    if args.checkpoint is not None:
        tok = VideoTokenizer.load_frozen(args.checkpoint).to(device)
        num_frames = args.num_frames or tok.num_frames
        resolution = args.resolution or tok.resolution
        grid = tok.latent_shape(num_frames, resolution, resolution)  # raises with the fix for a bad clip shape
        discrete = tok.codebook_size is not None
        kind = "tokens" if discrete else "latents"
        info = {"checkpoint": os.path.abspath(args.checkpoint), "kind": kind, "bottleneck": tok.bcfg.kind,
                "codebook_size": tok.codebook_size, "shape": list(grid[1:] if discrete else grid),
                "num_frames": num_frames, "resolution": resolution, "frame_stride": args.frame_stride}

    audio_tok, audio_info = None, None
    if args.audio_checkpoint is not None:
        from vidgen.lightning_modules.soundstream import SoundStream

        audio_tok = SoundStream.load_frozen(args.audio_checkpoint).to(device)
        audio_info = {"checkpoint": os.path.abspath(args.audio_checkpoint), "sample_rate": audio_tok.sample_rate,
                      "levels": audio_tok.config.levels, "codebook_size": audio_tok.config.codebook_size,
                      "hop": audio_tok.hop, "order": "level-major [levels, frames]"}
        if info is not None:
            info["audio_tokenizer"] = dict(audio_info)
        audio_info["clips_without_audio"] = 0

    os.makedirs(args.out, exist_ok=True)
    old = [f for f in os.listdir(args.out) if f.endswith(".tar")]
    if old and not args.overwrite:
        raise TokenizeError(f"{args.out} already holds {len(old)} shard(s); pass --overwrite or pick another --out")
    for f in old:
        os.remove(os.path.join(args.out, f))
    urls = expand_shards(args.shards, what="--shards")
    spec = ClipSpec(num_frames=num_frames, frame_stride=args.frame_stride, fps=args.fps, height=resolution,
                    width=resolution, crop="center", audio_rate=None if audio_tok is None else audio_tok.sample_rate,
                    audio_policy="skip" if args.audio_required else "silence")
    loader = torch.utils.data.DataLoader(_ShardClips(urls, spec), batch_size=args.batch_size,
                                         num_workers=args.num_workers, collate_fn=list)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    dtype = np.int16 if discrete and tok is not None and tok.codebook_size <= 2 ** 15 else np.int32
    writer = ShardWriter(args.out, kind, max_samples=args.samples_per_shard)
    t0, n, skipped = time.perf_counter(), 0, {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for samples in loader:
        good = []
        for smp in samples:
            if "skip" in smp:
                skipped[smp["skip"]] = skipped.get(smp["skip"], 0) + 1
            else:
                good.append(smp)
        _add_text(good, text_encoder, args.max_text_tokens, device)
        groups: dict[tuple, list[dict]] = {}
        for smp in good:  # stills (T = 1) and clips are encoded separately; token samples pass through
            if "video" not in smp:
                if "npy" not in smp["members"]:
                    raise TokenizeError(f"sample {smp['key']} holds latents without their .npy member")
                writer.write(smp["key"], {"npy": smp["members"]["npy"], **_members(smp, info), **_text_member(smp)})
                n += 1
                continue
            if tok is None:
                raise TokenizeError(f"sample {smp['key']} is a video/image: tokenising it needs --checkpoint")
            groups.setdefault(tuple(smp["video"].shape), []).append(smp)
        for group in groups.values():
            video = to_float(torch.stack([g["video"] for g in group]).to(device, non_blocking=True))
            with torch.no_grad(), autocast:
                out = tok.encode(video, sample=args.latents == "sample", generator=gen) \
                    if tok.bcfg.kind == "kl" else tok.encode(video)
            out = out.cpu()
            sounds = _audio_tokens(group, audio_tok, audio_info)
            for i, smp in enumerate(group):
                arr = out[i].numpy().astype(dtype) if discrete else \
                    out[i].float().numpy().astype(np.float16 if args.float16 else np.float32)
                writer.write(smp["key"], {"npy": _npy(arr), **_members(smp, info), **_text_member(smp), **sounds[i]})
                n += 1
    shards = writer.close()  # counts and sizes known while writing: no re-scan
    extra = {"tokenizer": info} if info is not None else {}
    if audio_info is not None:
        extra["audio_tokenizer"] = audio_info
    if text_encoder is not None:
        extra["text_encoder"] = {"kind": args.text_encoder, "path": args.text_encoder_path,
                                 "max_text_tokens": args.max_text_tokens, "dim": int(text_encoder.token_dim)}
    index = make_index(shards, skipped=[{"reason": k, "count": v} for k, v in sorted(skipped.items())], **extra)
    write_index(args.out, index)
    dt = time.perf_counter() - t0
    print(f"vidgen tokenize: {n} clips -> {len(shards)} shard(s) of {kind} {info['shape'] if info else '(kept)'} "
          f"{'+ text embeddings ' if text_encoder is not None else ''}in {args.out} "
          f"({n / max(dt, 1e-9):.1f} clips/s; skipped {sum(skipped.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
