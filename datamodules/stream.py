"""The deterministic sample stream behind ``VideoDataModule``.

Order.  Every rank runs ``N`` DataLoader workers; each is a *logical* stream ``slot = rank * N + l``.  For each source,
pass ``p`` orders the shards with a permutation seeded by ``(seed, source, p)``.  With at least ``world * N`` shards,
slot ``s`` takes shards ``s, s + S, ...`` (``S = world * N``); with fewer, every slot reads every shard and keeps
sample positions ``j ≡ s (mod S)``.  Inside a shard the samples are permuted by ``(seed, source, p, shard)``.
Resampled mode draws shards with replacement instead.  A sample's augmentation RNG is keyed by its identity, so a
sample decodes to the same tensor whenever it is read.

Batches.  Batch ``g`` of a rank (counted over the whole run) comes from logical worker ``g mod N``; the DataLoader's
round-robin over workers delivers them in that order.  Its source is drawn from the mixture weights of the stage in
force at ``g`` (a shared-memory table, so a curriculum can change weights or clip shape without rebuilding workers).
Samples are grouped by (source, stage, shape) and a batch is emitted when its bucket is full, so a mixed image/video
stream never breaks collation.

State.  Every batch carries a snapshot of its worker's state *after* that batch: each source's cursor
``(pass, shard position, sample position)``, the positions of samples held in buckets, the batch counter and the
bad-sample counters.  The datamodule records the snapshot of the batch the model consumed; resuming restarts each
logical worker from it: whole shards are skipped by position, samples by header-only tar offsets, and held samples
are re-read by position.  Nothing before the cursor is decoded.

Evaluation (val/test/predict).  One pass, no cycling: rank ``r`` reads its share of the split (slot ``r`` of ``world``)
in shard order, and batch ``k`` holds positions ``[k * B, k * B + size_k)`` of that sequence, from logical worker
``k mod N``.  ``size_k`` follows the longest rank, so every rank gets the same number of batches of the same sizes;
in one process every clip comes exactly once and only the last batch is partial.  A position past a shorter rank's
end (or a sample that does not decode) is filled with a repeat of a real clip, marked ``batch["valid"]`` False.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import tario
from .decode import ARRAY_KEYS, STACKED_EXTRAS, ClipSpec, SkipSample, decode_sample, sample_shape
from .motion import collate_motion

MAX_STAGES = 32
MAX_SOURCES = 16
_BAD_EXAMPLES = 8


class BadDataError(RuntimeError):
    """Too large a fraction of samples could not be used."""


@dataclasses.dataclass
class Source:
    name: str
    urls: list[str]
    counts: dict[str, int]
    weight: float = 1.0
    batch_size: int | None = None

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts.values()))


class StageTable:
    """Shared-memory schedule: rows ``[start_batch, num_frames, height, width, w_0 .. w_{K-1}]`` sorted by start.

    Forked workers read it at every batch, so a change made in the main process reaches running workers; rows start at
    a rank-local batch index, so the stream stays a pure function of the table."""

    def __init__(self, num_sources: int, num_frames: int, height: int, width: int, weights: list[float]):
        self.k = num_sources
        self.table = torch.full((MAX_STAGES, 4 + MAX_SOURCES), -1.0, dtype=torch.float64).share_memory_()
        # per-stage fps range [lo, hi] (-1: the data config's own); a row may carry it as a 6th element
        self.fps = torch.full((MAX_STAGES, 2), -1.0, dtype=torch.float64).share_memory_()
        self.set_rows([(0, num_frames, height, width, weights)])

    def set_rows(self, rows: list[tuple]):
        if len(rows) > MAX_STAGES:
            raise ValueError(f"at most {MAX_STAGES} curriculum stages are supported")
        t = torch.full_like(self.table, -1.0)
        fps = torch.full_like(self.fps, -1.0)
        for i, row in enumerate(sorted(rows, key=lambda r: r[0])):
            start, nf, h, w, wts = row[:5]
            if len(row) > 5 and row[5] is not None:
                fps[i] = torch.tensor([float(row[5][0]), float(row[5][1])], dtype=torch.float64)
            if len(wts) != self.k:
                raise ValueError(f"mixture weights {list(wts)} must have one entry per source ({self.k})")
            if any(x < 0 for x in wts) or sum(wts) <= 0:
                raise ValueError(f"mixture weights {list(wts)} must be >= 0 with a positive sum")
            t[i, :4] = torch.tensor([start, nf, h, w], dtype=torch.float64)
            t[i, 4 : 4 + self.k] = torch.tensor(list(wts), dtype=torch.float64)
        self.table.copy_(t)
        self.fps.copy_(fps)

    def fps_range(self, sid: int) -> tuple[float, float] | None:
        """The fps range stage ``sid`` sets, or None (keep the data config's)."""
        lo, hi = self.fps[sid].tolist()
        return None if lo < 0 else (lo, hi)

    def rows(self) -> list[tuple]:
        out = []
        for r in self.table.tolist():
            if r[0] < 0:
                break
            out.append((int(r[0]), int(r[1]), int(r[2]), int(r[3]), r[4 : 4 + self.k]))
        return out

    def at(self, g: int) -> tuple[int, tuple]:
        """(stage id, row) in force at batch ``g``."""
        rows = self.rows()
        sid = 0
        for i, r in enumerate(rows):
            if r[0] <= g:
                sid = i
        return sid, rows[sid]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


_SALT_PASS, _SALT_PERM, _SALT_DRAW, _SALT_AUG, _SALT_MIX = 11, 13, 17, 19, 23


class SourceStream:
    """One source as seen by one logical slot; ``cursor = [pass, shard_pos, sample_pos]``."""

    def __init__(self, src: Source, src_idx: int, slot: int, nslots: int, seed: int, shuffle: bool, resampled: bool,
                 cycle: bool, cursor=None, counters=None, split_by: str = "auto"):
        self.src, self.si, self.slot, self.S = src, src_idx, slot, nslots
        self.seed, self.shuffle, self.resampled, self.cycle = seed, shuffle, resampled, cycle
        self.cursor = list(cursor) if cursor is not None else [0, 0, 0]
        self.sample_split = not resampled and use_sample_split(len(src.urls), nslots, split_by)
        self.counters = counters if counters is not None else {}
        self._listings: OrderedDict[str, tario.ShardListing] = OrderedDict()
        self._fh = None
        self._fh_url = None
        self._stream = None  # (url, iterator, next position) for remote shards
        self._empty_passes = 0
        self._plan: tuple[int, list[int]] | None = None
        self._pos: tuple[tuple, list[int]] | None = None

    # -- plan ------------------------------------------------------------------------------------------------
    def shard_plan(self, p: int) -> list[int]:
        if self._plan is not None and self._plan[0] == p:  # called per sample: memoise the current pass
            return self._plan[1]
        n = len(self.src.urls)
        order = _rng(self.seed, _SALT_PASS, self.si, p).permutation(n) if self.shuffle else np.arange(n)
        plan = order.tolist() if self.sample_split else order[self.slot :: self.S].tolist()
        self._plan = (p, plan)
        return plan

    def shard_at(self, p: int, i: int) -> int | None:
        if self.resampled:
            return int(_rng(self.seed, _SALT_DRAW, self.si, self.slot, p, i).integers(len(self.src.urls)))
        plan = self.shard_plan(p)
        return plan[i] if i < len(plan) else None

    def listing(self, url: str) -> tario.ShardListing:
        if url not in self._listings:
            lst = tario.scan_local(url)
            if lst.truncated:
                self.counters["truncated_shards"] = self.counters.get("truncated_shards", 0) + 1
            if lst.incomplete:  # the sample cut by the truncation is bad (its complete neighbours are kept)
                for k in ("seen", "truncated"):
                    self.counters[k] = self.counters.get(k, 0) + lst.incomplete
                _note_bad(self.counters, f"{os.path.basename(url)}: tar cut inside a sample")
            self._listings[url] = lst
            while len(self._listings) > 4:
                self._listings.popitem(last=False)
        return self._listings[url]

    def positions(self, p: int, i: int, ui: int) -> list[int]:
        """Sample indices (tar order) this slot reads from shard ``ui`` at plan position ``(p, i)``, in read order."""
        if self._pos is not None and self._pos[0] == (p, i, ui):  # called per sample: memoise the current shard
            return self._pos[1]
        url = self.src.urls[ui]
        n = len(self.listing(url).samples)
        perm = _rng(self.seed, _SALT_PERM, self.si, p, ui, i if self.resampled else 0).permutation(n) if self.shuffle else np.arange(n)
        if self.sample_split:
            perm = perm[self.slot :: self.S]
        self._pos = ((p, i, ui), perm.tolist())
        return self._pos[1]

    # -- reading ---------------------------------------------------------------------------------------------
    def _read_local(self, url: str, ref: tario.SampleRef) -> dict[str, bytes]:
        if ref.file is not None:  # a file list's row: the file it names
            return tario.read_sample(url, ref)
        if self._fh_url != url:
            if self._fh is not None:
                self._fh.close()
            self._fh, self._fh_url = open(url, "rb"), url
        return tario.read_sample(url, ref, self._fh)

    def _read_remote(self, url: str, j: int):
        """Sequential read of a remote shard; position ``j`` counts this slot's samples."""
        if self._stream is None or self._stream[0] != url or self._stream[2] > j:
            self._stream = [url, tario.iter_stream(url), 0, 0]  # url, iterator, my next position, raw position
        st = self._stream
        for key, sample in st[1]:
            raw = st[3]
            st[3] += 1
            if self.sample_split and raw % self.S != self.slot:
                continue
            pos = st[2]
            st[2] += 1
            if pos == j:
                return key, sample
        return None

    def read_at(self, p: int, i: int, j: int):
        """(key, sample, url, identity) at cursor position, or None when the shard holds no such position."""
        ui = self.shard_at(p, i)
        url = self.src.urls[ui]
        if tario.is_remote(url):
            got = self._read_remote(url, j)
            if got is None:
                return None
            return got[0], got[1], url, (ui, j)
        pos = self.positions(p, i, ui)
        if j >= len(pos):
            return None
        ref = self.listing(url).samples[pos[j]]
        return ref.key, self._read_local(url, ref), url, (ui, pos[j])

    def next(self):
        """The next raw item and its position ``(p, i, j)``; cycles passes. Returns None only when not cycling."""
        while True:
            p, i, j = self.cursor
            if not self.resampled and i >= len(self.shard_plan(p)):
                if not self.cycle:
                    return None
                self.cursor = [p + 1, 0, 0]
                continue
            try:
                item = self.read_at(p, i, j)
            except (OSError, EOFError) as e:
                self.counters["unreadable_shards"] = self.counters.get("unreadable_shards", 0) + 1
                _note_bad(self.counters, f"{self.src.urls[self.shard_at(p, i)]}: {e}")
                item = None
            if item is None:  # shard done
                self.cursor = [p, i + 1, 0]
                if j == 0:
                    self._empty_passes += 1
                    if self._empty_passes > 4 * max(1, len(self.src.urls)):
                        raise BadDataError(
                            f"source {self.src.name!r}: no readable samples for slot {self.slot} in "
                            f"{len(self.src.urls)} shard(s); the shards are empty or unreadable"
                        )
                continue
            self._empty_passes = 0
            self.cursor = [p, i, j + 1]
            return item, (p, i, j)

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def bucket_key(key) -> tuple:
    """``(source, stage, kind, shape)`` as a hashable tuple of plain values.

    A worker's snapshot travels through the DataLoader, whose conversion turns tuples into lists (and a resumed
    snapshot comes back from the checkpoint the same way), so the key is rebuilt at every level."""
    si, sid, kind, shape = key
    return int(si), int(sid), str(kind), tuple(int(x) for x in shape)


def use_sample_split(num_shards: int, nslots: int, split_by: str) -> bool:
    """Shard-level split unless it would be unbalanced: fewer shards than slots, or a remainder that is large
    relative to the shards each slot gets (then every slot reads every shard and keeps every S-th sample)."""
    if split_by != "auto":
        return split_by == "sample"
    return num_shards < nslots or (num_shards % nslots != 0 and num_shards < 8 * nslots)


def _note_bad(counters: dict, example: str):
    ex = counters.setdefault("examples", [])
    if len(ex) < _BAD_EXAMPLES:
        ex.append(example)


@dataclasses.dataclass
class StreamConfig:
    seed: int
    batch_size: int
    spec: ClipSpec
    train: bool = True
    shuffle: bool = True
    resampled: bool = False
    max_bad_fraction: float = 0.2
    bad_min_samples: int = 32
    split_by: str = "auto"  # auto | shard | sample


class VideoStream(IterableDataset):
    """Worker-side stream. The main process sets ``rank``, ``world``, ``rotate``, ``quotas`` and ``start_states``
    before each iteration (see ``VideoDataModule``)."""

    def __init__(self, sources: list[Source], cfg: StreamConfig, stages: StageTable):
        super().__init__()
        _reap_workers_at_exit()
        self.sources, self.cfg, self.stages = sources, cfg, stages
        self.rank, self.world = 0, 1
        self.rotate = 0
        self.quotas: dict[int, int] | None = None  # logical worker -> batches to emit (None: infinite)
        self.start_states: dict[int, dict] = {}
        self.eval_samples = 0  # eval: samples of the longest rank's share (fixes every rank's batch layout)
        self.eval_split_shapes = False  # eval: split a batch that mixes shapes (else an error); one plain process

    def spec_for(self, row: tuple, sid: int | None = None) -> ClipSpec:
        _, nf, h, w, _ = row
        spec = dataclasses.replace(self.cfg.spec, num_frames=nf, height=h, width=w)
        fps_range = self.stages.fps_range(sid) if sid is not None else None
        return spec if fps_range is None else dataclasses.replace(spec, fps_range=fps_range)

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            protect_worker()
        pid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        lw = (pid + self.rotate) % n
        quota = None if self.quotas is None else self.quotas.get(lw, 0)
        state = self.start_states.get(lw)
        if not self.cfg.train:
            yield from self._run_eval(lw, n)
            return
        yield from self._run(lw, n, quota, state)

    def _run_eval(self, lw: int, n: int):
        """One eval pass of this rank's share: batches ``k = lw, lw + n, ...`` of the layout in the module docstring."""
        cfg, bs, total = self.cfg, self.cfg.batch_size, self.eval_samples
        sizes = [min(bs, total - k * bs) for k in range(max(1, math.ceil(total / bs)))]
        spec = self.spec_for(self.stages.at(0)[1], 0)
        counters = {"seen": 0, "ok": 0, "examples": []}
        stream = SourceStream(self.sources[0], 0, self.rank, self.world, cfg.seed, False, False, cycle=False,
                              counters=counters, split_by=cfg.split_by)
        mine = iter(range(lw, len(sizes), n))
        k, samples, pad = next(mine, None), [], []
        try:
            for q, pos, got in eval_walk(stream):
                while k is not None and q >= k * bs + sizes[k]:  # batch k is complete
                    yield from self._eval_batches(k, sizes[k], samples, pad, spec, counters)
                    k, samples = next(mine, None), []
                if k is None:
                    break
                if q < k * bs:
                    continue  # another worker's batch: local samples are skipped without reading them
                try:
                    got = got or stream.read_at(*pos)
                except (OSError, EOFError) as e:
                    counters["seen"] += 1
                    counters["unreadable"] = counters.get("unreadable", 0) + 1
                    _note_bad(counters, f"{stream.src.urls[stream.shard_at(*pos[:2])]}: {e}")
                    self._check_bad(counters)
                    continue
                sample = self._decode(stream, got, pos, spec, counters)
                if sample is not None:
                    samples.append(sample)
            while k is not None:  # this rank's share ended: the rest of the layout is padding
                yield from self._eval_batches(k, sizes[k], samples, pad, spec, counters)
                k, samples = next(mine, None), []
        finally:
            stream.close()

    def _eval_batches(self, k: int, size: int, samples: list[dict], pad: list, spec: ClipSpec, counters: dict):
        """Batch ``k`` of ``size``: the real samples, then repeats (``valid`` False) up to ``size``. Samples of
        different shapes go into one batch per shape where ``eval_split_shapes`` allows it (a plain loop in one
        process: the batch count may then exceed the loader's length)."""
        groups: dict[tuple, list[dict]] = {}
        for s in samples:
            groups.setdefault(sample_shape(s), []).append(s)
        if len(groups) > 1:
            if not self.eval_split_shapes:
                raise BadDataError(
                    f"eval batch {k} mixes clip shapes {sorted(groups)} (images beside videos with "
                    "data.image_frames=single, or soundtracks of different lengths without data.fps); under "
                    "Lightning or DDP an eval batch needs one shape: use one kind per split, set "
                    "data.image_frames=repeat or data.fps, or data.val_batch_size=1")
            for g in groups.values():
                yield self._eval_batch(k, len(g), g, pad, spec, counters)
            return
        yield self._eval_batch(k, size, samples, pad, spec, counters)

    def _eval_batch(self, k: int, size: int, samples: list[dict], pad: list, spec: ClipSpec, counters: dict) -> dict:
        """``samples`` (one shape) and repeats of a real clip up to ``size``; ``valid`` marks the real ones."""
        if not samples and not pad:
            pad.append(self._eval_pad_sample(spec))
        fill = samples[0] if samples else pad[0]
        batch = self._collate(samples + [fill] * (size - len(samples)), {"g": k, "counters": dict(counters)})
        batch["valid"] = torch.arange(size) < len(samples)
        return batch

    def _eval_pad_sample(self, spec: ClipSpec) -> dict:
        """A real clip to pad with: this rank's first usable sample, else the split's."""
        src = self.sources[0]
        for slot, nslots in ((self.rank, self.world), (0, 1)):
            s = SourceStream(src, 0, slot, nslots, self.cfg.seed, False, False, cycle=False, counters={},
                             split_by=self.cfg.split_by)
            try:
                for _, pos, got in eval_walk(s):
                    try:
                        key, raw, url, _ = got or s.read_at(*pos)
                        sample = decode_sample(key, raw, spec, None)
                    except (SkipSample, OSError, EOFError):
                        continue
                    sample["key"] = f"{os.path.basename(url)}/{key}"
                    return sample
            finally:
                s.close()
        raise BadDataError(f"source {src.name!r}: no usable sample in the split to evaluate")

    def _run(self, lw: int, n: int, quota: int | None, state: dict | None):
        cfg = self.cfg
        slot, nslots = self.rank * n + lw, self.world * n
        counters = dict(state["counters"]) if state else {"seen": 0, "ok": 0}
        counters["examples"] = list(counters.get("examples", []))
        cursors = state["cursors"] if state else [None] * len(self.sources)
        streams = [
            SourceStream(s, si, slot, nslots, cfg.seed, cfg.shuffle, cfg.resampled, cycle=True, cursor=cursors[si],
                         counters=counters, split_by=cfg.split_by)
            for si, s in enumerate(self.sources)
        ]
        emitted = state["emitted"] if state else 0
        buckets: OrderedDict[tuple, list] = OrderedDict()
        if state:  # re-read the samples that were held in buckets, by position
            for bkey, refs in state["pending"]:
                bkey = bucket_key(bkey)
                for ref in refs:
                    si, pos = int(ref[0]), [int(x) for x in ref[1:]]
                    got = streams[si].read_at(*pos)
                    sample = self._decode(streams[si], got, pos, self.spec_for(self.stages.rows()[bkey[1]], bkey[1]), counters, recount=False)
                    buckets.setdefault(bkey, []).append((sample, [si, *pos]))
        produced = 0
        try:
            while quota is None or produced < quota:
                g = emitted * n + lw
                sid, row = self.stages.at(g)
                spec = self.spec_for(row, sid)
                for k in [k for k in buckets if k[1] != sid]:  # a stage changed the clip shape: drop stale samples
                    counters["dropped_stage_change"] = counters.get("dropped_stage_change", 0) + len(buckets.pop(k))
                si = self._choose_source(g, row[4])
                bs = self.sources[si].batch_size or cfg.batch_size
                batch, failures = None, 0
                while batch is None:
                    item = streams[si].next()
                    if item is None:  # pragma: no cover - streams cycle
                        return
                    (key, raw, url, ident), pos = item
                    sample = self._decode(streams[si], (key, raw, url, ident), pos, spec, counters)
                    if sample is None:
                        failures += 1
                        if failures > self.sources[si].num_samples:  # a whole pass without one usable sample
                            examples = "; ".join(counters.get("examples", [])[:5])
                            raise BadDataError(f"source {self.sources[si].name!r}: no usable samples in a full pass "
                                               f"({failures} tried). Examples: {examples}")
                        continue
                    bkey = bucket_key((si, sid, sample["kind"], sample_shape(sample)))
                    bucket = buckets.setdefault(bkey, [])
                    bucket.append((sample, [si, *pos]))
                    if len(bucket) >= self.bucket_batch_size(bkey, bs):
                        batch = buckets.pop(bkey)
                emitted += 1
                produced += 1
                snap = {
                    "g": g,
                    "worker": lw,
                    "emitted": emitted,
                    "cursors": [list(s.cursor) for s in streams],
                    "pending": [[list(k), [r for _, r in v]] for k, v in buckets.items()],
                    "counters": {k: (list(v) if isinstance(v, list) else v) for k, v in counters.items()},
                    "source": self.sources[si].name,
                    "stage": sid,
                }
                yield self._collate([s for s, _ in batch], snap)
        finally:
            for s in streams:
                s.close()

    def bucket_batch_size(self, bkey: tuple, default: int) -> int:
        """Samples per batch of bucket ``bkey`` (here the source's or global batch size; ``BucketedVideoStream`` gives
        each Open-Sora bucket its own)."""
        return default

    def _choose_source(self, g: int, weights) -> int:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 1:
            return 0
        u = _rng(self.cfg.seed, _SALT_MIX, self.rank, g).random()
        return int(min(np.searchsorted(np.cumsum(w / w.sum()), u, side="right"), len(w) - 1))

    def _decode(self, stream: SourceStream, got, pos, spec: ClipSpec, counters: dict, recount: bool = True):
        key, raw, url, (ui, tar_pos) = got
        p = pos[0]
        rng = _rng(self.cfg.seed, _SALT_AUG, stream.si, p, ui, tar_pos) if self.cfg.train else None
        if recount:
            counters["seen"] = counters.get("seen", 0) + 1
        try:
            sample = decode_sample(key, raw, spec, rng)
        except SkipSample as e:
            if not recount:
                raise BadDataError(f"sample {url}:{key} held at checkpoint time no longer decodes ({e})") from e
            counters[e.reason] = counters.get(e.reason, 0) + 1
            _note_bad(counters, f"{os.path.basename(url)}:{key} ({e.reason}: {e.detail[:80]})")
            self._check_bad(counters)
            return None
        if recount:
            counters["ok"] = counters.get("ok", 0) + 1
        sample["key"] = f"{os.path.basename(url)}/{key}"  # shard/key: unique across shards, traceable
        return sample

    def _check_bad(self, counters: dict):
        seen, ok = counters.get("seen", 0), counters.get("ok", 0)
        bad = seen - ok
        if seen >= self.cfg.bad_min_samples and bad / seen > self.cfg.max_bad_fraction:
            examples = "; ".join(counters.get("examples", [])[:5])
            raise BadDataError(
                f"{bad} of {seen} samples ({bad / seen:.0%}) could not be used, above max_bad_fraction="
                f"{self.cfg.max_bad_fraction}. Examples: {examples}. Fix or re-shard the data (`vidgen shards`), "
                "or raise data.max_bad_fraction if this is expected."
            )

    def _collate(self, samples: list[dict], snap: dict) -> dict:
        # one bucket = one kind and shape; video stays uint8 (4x less to ship between processes than float)
        arrays = {k: torch.stack([s[k] for s in samples]) for k in ARRAY_KEYS if k in samples[0]}
        for k in STACKED_EXTRAS:  # token shards' cached text embeddings / audio tokens, when every sample has them
            if all(k in s for s in samples):
                arrays[k] = torch.stack([s[k] for s in samples]) if k not in ("text_len", "has_audio") else \
                    torch.tensor([s[k] for s in samples], dtype=torch.long if k == "text_len" else torch.bool)
        return {
            **arrays,
            **collate_motion(samples),  # Tora: trajectories / flow when every sample has them
            "text": [s["text"] for s in samples],
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
            "key": [s["key"] for s in samples],
            "_state": snap,
        }


_PROTECTED: set[int] = set()
_REAPER: list[int] = []
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - at exit, one child's failure must not stop the cleanup of the others
        pass


def _reap_daemon_children() -> None:
    """SIGTERM, a short grace period, then SIGKILL for the daemonic children still alive (see below)."""
    import multiprocessing as mp
    import time

    if os.getpid() not in _REAPER:  # a forked child inherited the hook
        return
    # torch's DataLoader installs a SIGCHLD handler that raises "worker killed by signal" in whatever code runs
    # when a worker dies: here, that would abort this hook after the first kill and leave the others to
    # multiprocessing's endless join. Nothing is waiting for worker errors any more at exit.
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    kids = [p for p in mp.active_children() if p.daemon]
    for p in kids:
        _quietly(p.terminate)
    deadline = time.monotonic() + 1.0
    for p in kids:
        _quietly(p.join, max(0.0, deadline - time.monotonic()))
    left = [p for p in kids if p.is_alive()]
    for p in left:  # kill every one first, then wait: one stuck join must not spare the rest
        _quietly(p.kill)
    for p in left:
        _quietly(p.join, 1.0)


def _reap_workers_at_exit() -> None:
    """In the main process, once: at exit, end daemonic children that ignored ``terminate()``.

    multiprocessing ends daemonic children at exit with SIGTERM, then waits for them without a timeout; workers
    that ignore SIGTERM (see :func:`protect_worker`) and were not shut down (an exception left their DataLoader
    iterator alive) would make that wait endless. This hook runs first (atexit is last-in, first-out): SIGTERM,
    a short grace period, then SIGKILL for what is left."""
    if os.getpid() in _REAPER:
        return
    _REAPER.append(os.getpid())
    import atexit
    import multiprocessing.util  # noqa: F401 - registers its own exit hook now, so ours (registered after) runs first

    atexit.register(_reap_daemon_children)


def protect_worker() -> None:
    """Make this DataLoader worker survive a preemption signal and die with its parent (once per process).

    SLURM and ``scancel`` signal the whole process group: a worker that dies of SIGTERM makes the main process fail
    ("DataLoader worker ... is killed by signal") before it can save. Workers ignore SIGTERM/SIGUSR1 and leave the
    decision to the main process, which checkpoints and shuts them down. ``PR_SET_PDEATHSIG`` (Linux) kills a
    worker when the main process dies without that shutdown (SIGKILL, OOM), instead of leaving it orphaned."""
    pid = os.getpid()
    if pid in _PROTECTED:
        return
    _PROTECTED.add(pid)
    for name in PREEMPTION_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: torch's watchdog still ends the worker
            return
        if os.getppid() == 1:  # the parent died before the request took effect
            os._exit(0)


def eval_walk(stream: SourceStream):
    """``(q, (p, i, j), item)`` over a non-cycling slot's single pass (``q`` counts positions). Local shards are walked
    by their listings and give ``item`` None (read it with ``read_at``); remote ones are read in order."""
    q = 0
    for i, ui in enumerate(stream.shard_plan(0)):
        url = stream.src.urls[ui]
        try:
            if not tario.is_remote(url):
                for j in range(len(stream.positions(0, i, ui))):
                    yield q, (0, i, j), None
                    q += 1
                continue
            for j in range(1 << 62):
                item = stream.read_at(0, i, j)
                if item is None:
                    break
                yield q, (0, i, j), item
                q += 1
        except (OSError, EOFError) as e:
            stream.counters["unreadable_shards"] = stream.counters.get("unreadable_shards", 0) + 1
            _note_bad(stream.counters, f"{url}: {e}")


def eval_rank_samples(src: Source, rank: int, world: int, split_by: str) -> int:
    """Samples of ``src`` in rank ``rank``'s eval share (slot ``rank`` of ``world``, shards in order, see ``eval_walk``)."""
    urls = src.urls
    if use_sample_split(len(urls), world, split_by):
        return sum(len(range(rank, src.counts[u], world)) for u in urls)
    return sum(src.counts[u] for u in urls[rank::world])


def split_quota(remaining: int, offset: int, n: int) -> dict[int, int]:
    """Batches each logical worker emits when ``remaining`` batches are left and the next comes from ``offset``."""
    base, extra = divmod(remaining, n)
    return {l: base + (1 if (l - offset) % n < extra else 0) for l in range(n)}


def epoch_batches(num_samples: int, world: int, batch_size: int, drop_last: bool = True) -> int:
    per = num_samples / (world * batch_size)
    return int(math.floor(per) if drop_last else math.ceil(per))
