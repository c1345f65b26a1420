"""``VideoDataModule``: WebDataset video/image shards (or files plus a CSV) -> ``{"video": [B,C,T,H,W] in [-1,1],
"text", "label", "fps", "key"}``.

Works under Lightning and in a plain PyTorch loop::

    dm = VideoDataModule(train_shards="data/demo/train", seed=0, num_frames=16, resolution=64, batch_size=4)
    dm.setup("fit")
    for step, batch in enumerate(dm.train_dataloader()):
        ...
        if step % 1000 == 0:
            data = dm.state_dict()   # on every rank (a collective under torch.distributed), then save on rank 0
            torch.save({"data": data, ...}, "ckpt.pt")   # resume with dm.load_state_dict(...)

The state records what the model *consumed*.  In a plain loop a batch counts as consumed once the loader has yielded
it; under Lightning (which prefetches one batch) it counts when it reaches the model, in ``on_before_batch_transfer``.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from . import tario
from .filelist import FileListError
from .decode import AUDIO_POLICIES, CROPS, SHORT_POLICIES, ClipSpec, to_float
from .stream import (MAX_SOURCES, Source, StageTable, StreamConfig, VideoStream, epoch_batches, eval_rank_samples,
                     split_quota)

log = logging.getLogger(__name__)
STATE_FORMAT = 1


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the key and the fix."""


def _hw(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        return int(resolution[0]), int(resolution[1])
    raise DataConfigError(f"data.resolution must be an int or [height, width], got {resolution!r}")


class VideoDataModule(L.LightningDataModule):
    """Sharded video/image streaming with exact mid-epoch resume, mixtures, bucketing and bad-sample accounting.

    Args:
        train_shards: brace pattern, directory, glob or list of shards for training (a single source). A shard may
            also be a file list: a CSV in Open-Sora's layout (``path``, ``text``, optional ``num_frames``, ``height``,
            ``width``, ``fps``, ``aspect_ratio``, ``label``) or a JSONL, its rows read as the samples of one shard
            (``datamodules/filelist.py``), so seeds, the split over ranks and workers and exact resume are the tar
            shards' own. A missing ``path`` column or a listed file that does not exist is a config error here.
        sources: a weighted mixture instead of ``train_shards``: ``[{"shards": ..., "weight": 0.9, "name": "images",
            "batch_size": null}, ...]``. Each batch comes from one source drawn by weight; weights (and clip shape) can
            change between curriculum stages through :meth:`set_stages` without rebuilding the loader.
        val_shards / test_shards / predict_shards: evaluation shards (deterministic clips, center crop, no flip).
            An eval epoch yields every clip once (the last batch partial); eval batches carry ``valid`` bool ``[B]``.
            Under DDP every rank gets the same number of batches of the same sizes: a shorter rank's are filled
            with repeats of its clips marked ``valid`` False, which metrics should drop (``batch["valid"]``).
        seed: required; fixes shard order, in-shard order, clip offsets, crops and flips.
        num_frames, frame_stride, fps: clip length and spacing (``fps`` resamples to a target rate and overrides the
            stride when the source fps is known).
        fps_range, fps_beta: a per-clip target fps ``lo + (hi - lo) * Beta(a, b)`` drawn from the sample's seeded RNG
            (Make-A-Video §3.4: 1..30 from a Beta distribution), recorded in ``batch["fps"]``; eval clips take the
            Beta mean. A curriculum stage may set its own ``fps_range`` (high fps first, then low).
        resolution: int (square) or [H, W]; the shorter side is resized, then cropped (``crop``: random|center).
        flip: random horizontal flip in training; leave it off when captions or labels name a horizontal direction
            ("moving left").
        short_video_policy: loop | pad | skip for videos shorter than the clip.
        motion: Tora: only samples with the ``traj.npy`` of ``vidgen trajectories`` (others skipped and counted as
            ``no_motion``); ``batch["trajectories"]`` / ``batch["flow"]`` follow the clip (``datamodules/motion.py``).
        image_frames: single (images give T=1) | repeat (T=num_frames).
        split_by: how shards are divided over ranks x workers: shard (whole shards), sample (every slot reads every
            shard and keeps every S-th sample; balanced for few shards) or auto (shard when that is balanced).
        resampled: draw shards with replacement forever (no epochs; use ``max_steps``); else finite epochs of
            ``samples_per_epoch`` (default: all samples) per pass, equal in length on every rank.
        require_labels: every training sample must carry a label (class-conditional models; their recipes set it):
            a sample without one is skipped and counted as ``missing_label`` (so ``max_bad_fraction`` is the policy
            for mixing unlabelled data), and shards whose ``index.json`` says they hold none are a config error.
        max_bad_fraction: above this fraction of unusable samples (after ``bad_min_samples``) the run stops with an
            error naming example keys; below it they are skipped and counted.
        audio_rate: decode each clip's soundtrack too (VideoPoet §2.2): the audio of the same start and duration as the
            clip, resampled to this rate, ``batch["audio"]`` float32 ``[B, audio_channels, S]`` in [-1, 1] with
            ``S = round(duration * audio_rate)`` and ``batch["has_audio"]`` bool ``[B]``. A separate audio member
            (``{key}.m4a``/``.wav``/``.mp3``/``.flac``, video2dataset style) is read before the video's own track.
            Set ``fps`` too so that every clip lasts ``num_frames / fps`` seconds (else clips of sources with other
            frame rates last longer or shorter and are batched apart).
        audio_channels: 1 (mean of the channels, default) or 2.
        audio_policy: samples without audio (no track, stills): ``silence`` (zeros and ``has_audio`` False) or
            ``skip`` (skipped and counted as ``no_audio``). A track that is present but silent is audio.
        bucket_config: Open-Sora v1.2 variable resolution/duration for training (``datamodules.buckets``):
            ``{resolution: {frames: [keep_prob, batch_size]}}``; each sample's clip shape and its batch's size come
            from its bucket (needs height/width/num_frames in the sample json); ``resolution``/``num_frames`` then
            only shape validation. An epoch still counts ``samples / batch_size`` batches.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        *,
        seed: int,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        sources: list[dict] | None = None,
        num_frames: int = 16,
        frame_stride: int = 1,
        fps: float | None = None,
        fps_range: list[float] | None = None,
        fps_beta: list[float] | None = None,
        resolution: int | list[int] = 128,
        crop: str = "random",
        flip: bool = False,
        short_video_policy: str = "loop",
        image_frames: str = "single",
        require_text: bool = False,
        require_labels: bool = False,
        motion: bool = False,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        shuffle: bool = True,
        split_by: str = "auto",
        max_bad_fraction: float = 0.2,
        bad_min_samples: int = 32,
        decoder: str = "auto",
        float_output: bool = True,  # False: video stays uint8 [0, 255] (convert it yourself, e.g. on the GPU)
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        bucket_config: dict | None = None,
        audio_rate: int | None = None,
        audio_channels: int = 1,
        audio_policy: str = "silence",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if seed is None:
            raise DataConfigError("data.seed is required (it fixes the sample order that exact resume depends on)")
        _check_choice("data.crop", crop, CROPS)
        _check_choice("data.short_video_policy", short_video_policy, SHORT_POLICIES)
        _check_choice("data.image_frames", image_frames, ("single", "repeat"))
        _check_choice("data.split_by", split_by, ("auto", "shard", "sample"))
        _check_choice("data.decoder", decoder, ("auto", "decord", "pyav"))
        for k, v, lo in (("num_frames", num_frames, 1), ("frame_stride", frame_stride, 1), ("batch_size", batch_size, 1),
                         ("num_workers", num_workers, 0)):
            if not isinstance(v, int) or v < lo:
                raise DataConfigError(f"data.{k} must be an integer >= {lo}, got {v!r}")
        if fps is not None and fps <= 0:
            raise DataConfigError(f"data.fps must be positive or null, got {fps!r}")
        fps_range, fps_beta = _check_fps_sampling(fps, fps_range, fps_beta)
        _check_choice("data.audio_policy", audio_policy, AUDIO_POLICIES)
        if audio_rate is not None and (not isinstance(audio_rate, int) or audio_rate < 1000):
            raise DataConfigError(f"data.audio_rate must be an integer sample rate >= 1000 (e.g. 16000) or null, got "
                                  f"{audio_rate!r}")
        if audio_channels not in (1, 2):
            raise DataConfigError(f"data.audio_channels must be 1 (mono) or 2 (stereo), got {audio_channels!r}")
        if audio_rate is not None and fps_range is not None:
            raise DataConfigError("data.audio_rate with data.fps_range: clips of random frame rates last random "
                                  "durations, so their audio cannot be batched; set data.fps instead (or drop one)")
        if not 0 <= max_bad_fraction <= 1:
            raise DataConfigError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        self.height, self.width = _hw(resolution)
        if train_shards is not None and sources is not None:
            raise DataConfigError("give either data.train_shards or data.sources (a mixture), not both")
        if sources is not None:
            if not sources or len(sources) > MAX_SOURCES:
                raise DataConfigError(f"data.sources must list 1..{MAX_SOURCES} sources")
            for i, s in enumerate(sources):
                if not isinstance(s, dict) or "shards" not in s:
                    raise DataConfigError(f"data.sources[{i}] must be a mapping with a 'shards' key, got {s!r}")
                unknown = set(s) - {"shards", "weight", "name", "batch_size"}
                if unknown:
                    raise DataConfigError(f"data.sources[{i}] has unknown keys {sorted(unknown)}; allowed: shards, weight, name, batch_size")
        self._source_specs = (
            [dict(s) for s in sources] if sources is not None
            else ([{"shards": train_shards, "name": "train"}] if train_shards is not None else [])
        )
        # Resolve patterns now: a pattern that matches nothing is a config error, reported before any work.
        self._urls: dict[str, list[str]] = {}
        for i, s in enumerate(self._source_specs):
            s.setdefault("name", f"source{i}")
            s.setdefault("weight", 1.0)
            key = "data.train_shards" if sources is None else f"data.sources[{i}].shards"
            self._urls[s["name"]] = _expand(s["shards"], key)
        for split, spec in (("val", val_shards), ("test", test_shards), ("predict", predict_shards)):
            if spec is not None:
                self._urls[f"__{split}"] = _expand(spec, f"data.{split}_shards")
        self.spec = ClipSpec(num_frames=num_frames, frame_stride=frame_stride, fps=fps, height=self.height,
                             width=self.width, crop=crop, flip=flip, short_policy=short_video_policy,
                             image_frames=image_frames, require_text=require_text, require_label=require_labels,
                             backend=decoder, motion=motion,
                             fps_range=fps_range, fps_beta=fps_beta, audio_rate=audio_rate,
                             audio_channels=audio_channels, audio_policy=audio_policy)
        if require_labels:
            self._check_labelled()
        self.buckets = None
        if bucket_config is not None:
            from .buckets import BucketConfig, BucketConfigError

            try:
                self.buckets = BucketConfig(bucket_config)
            except BucketConfigError as e:
                raise DataConfigError(f"data.{e}") from None
        self._sources: list[Source] | None = None
        self._stages: StageTable | None = None
        self._stage_rows: list[tuple] | None = None
        self._train_state = _fresh_state()
        self._loaded_ranks: list[dict] | None = None
        self._warned: set[str] = set()

    def _check_labelled(self) -> None:
        """``require_labels``: training data known to hold no labels (shards whose ``index.json`` says so, file lists
        without a label in any row) are a config error before any sample is read; shards without that count are
        checked per sample (unlabelled ones skipped and counted)."""
        for name, urls in self._urls.items():
            if name.startswith("__"):
                continue
            counts: dict[str, int | None] = {}  # a shard directory or a list -> its labelled samples (None: unknown)
            for u in urls:
                if tario.is_file_list(u):
                    counts[u] = tario.list_listing(u).labelled
                else:
                    d = os.path.dirname(os.path.abspath(u))
                    if d not in counts:
                        ix = tario.read_index(u)
                        counts[d] = ix.get("num_labelled") if isinstance(ix, dict) else None
            if counts and all(c == 0 for c in counts.values()):
                raise DataConfigError(
                    f"data.require_labels: the training data of {name!r} ({next(iter(counts))}) hold no labels "
                    "(index.json num_labelled: 0, or a list without a label column), but this recipe trains a "
                    "class-conditional model. Build labelled shards (`vidgen shards <root with one subfolder per "
                    "class> OUT`, or a CSV/JSONL label column), or train unconditionally. To mix labelled and "
                    "unlabelled data, keep require_labels and raise data.max_bad_fraction to the unlabelled share "
                    "(those samples are skipped and counted)")

    # ------------------------------------------------------------------ setup
    @property
    def num_frames(self) -> int:
        return self.hparams.num_frames

    def _rank_world(self) -> tuple[int, int]:
        hp = self.hparams
        if hp.rank is not None and hp.world_size is not None:
            return hp.rank, hp.world_size
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _make_sources(self, names: list[str], weights=None) -> list[Source]:
        out = []
        for i, name in enumerate(names):
            urls = self._urls[name]
            counts, scanned = tario.count_samples(urls)
            if scanned:
                self._warn_once(f"scan:{name}", f"{len(scanned)} shard(s) of {name!r} have no index.json entry; counted "
                                "samples by reading tar headers. `vidgen shards --reindex DIR` writes the index.")
            spec = self._source_specs[i] if weights is None else {}
            out.append(Source(name=name.strip("_"), urls=urls, counts=counts, weight=float(spec.get("weight", 1.0)),
                              batch_size=spec.get("batch_size")))
        return out

    def setup(self, stage: str | None = None):
        if self._sources is None and self._source_specs:
            self._sources = self._make_sources([s["name"] for s in self._source_specs])
            total = sum(s.num_samples for s in self._sources)
            if total == 0:
                raise DataConfigError("the training shards hold no samples")
            self._stages = StageTable(len(self._sources), self.spec.num_frames, self.height, self.width,
                                      [s.weight for s in self._sources])
            if self._stage_rows is not None:
                self._stages.set_rows(self._stage_rows)

    # ------------------------------------------------------------------ curriculum hooks
    def set_stages(self, stages: list[dict]):
        """Install a schedule: ``[{"start_batch": 0, "weights": [...], "num_frames": 16, "resolution": 128,
        "fps_range": [lo, hi]}, ...]`` (``fps_range`` needs the data's ``fps_range`` sampling on).

        ``start_batch`` counts batches consumed on this rank since the start of training.  Missing fields inherit
        from the previous stage (the first from the constructor).  Running workers see the change at once."""
        rows, prev = [], (0, self.spec.num_frames, self.height, self.width,
                          [float(s.get("weight", 1.0)) for s in self._source_specs])
        for st in sorted(stages, key=lambda s: s.get("start_batch", 0)):
            h, w = _hw(st["resolution"]) if st.get("resolution") is not None else (prev[2], prev[3])
            row = (int(st.get("start_batch", 0)), int(st.get("num_frames") or prev[1]), h, w,
                   [float(x) for x in st["weights"]] if st.get("weights") is not None else prev[4])
            fr = st.get("fps_range")
            if fr is not None:
                if self.spec.fps_range is None:
                    raise DataConfigError("a curriculum stage sets fps_range but the data has no fps sampling: set "
                                          "data.fps_range (and fps_beta) to turn it on")
                _check_fps_sampling(None, fr, list(self.spec.fps_beta))
                row = (*row, [float(fr[0]), float(fr[1])])
            elif len(prev) > 5:
                row = (*row, prev[5])
            rows.append(row)
            prev = row
        if not rows or rows[0][0] != 0:
            rows.insert(0, (0, self.spec.num_frames, self.height, self.width, [float(s.get("weight", 1.0)) for s in self._source_specs]))
        self._stage_rows = rows
        if self._stages is not None:
            self._stages.set_rows(rows)

    @property
    def batches_consumed(self) -> int:
        return self._train_state["consumed"]

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str) -> "_StreamLoader":
        rank, world = self._rank_world()
        hp = self.hparams
        if split == "train":
            self.setup("fit")
            if not self._sources:
                raise DataConfigError("no training data: set data.train_shards or data.sources")
            sources, stages, train = self._sources, self._stages, True
            bs = hp.batch_size
            if hp.resampled:
                length = None
            else:
                n = hp.samples_per_epoch or sum(s.num_samples for s in sources)
                length = epoch_batches(n, world, bs)
                if length == 0:
                    raise DataConfigError(f"an epoch of {n} samples is smaller than one batch on every rank "
                                          f"(world_size={world} x batch_size={bs}); lower data.batch_size")
        else:
            name = f"__{split}"
            if name not in self._urls:
                return None
            sources = self._make_sources([name], weights=[1.0])
            stages = StageTable(1, self.spec.num_frames, self.height, self.width, [1.0])
            bs = hp.val_batch_size or hp.batch_size
            longest = max(eval_rank_samples(sources[0], r, world, hp.split_by) for r in range(world))
            if longest == 0:
                raise DataConfigError(f"data.{split}_shards hold no samples")
            length = epoch_batches(longest, 1, bs, drop_last=False)
            train = False
        cfg = StreamConfig(seed=hp.seed, batch_size=bs, spec=self.spec, train=train, shuffle=train and hp.shuffle,
                           resampled=train and hp.resampled, max_bad_fraction=hp.max_bad_fraction,
                           bad_min_samples=hp.bad_min_samples, split_by=hp.split_by)
        if train and self.buckets is not None:
            from .buckets import BucketedVideoStream

            ds = BucketedVideoStream(sources, cfg, stages, self.buckets)
        else:
            ds = VideoStream(sources, cfg, stages)
        ds.rank, ds.world = rank, world
        if not train:
            ds.eval_samples = longest
            ds.eval_split_shapes = world == 1 and self.trainer is None  # Lightning stops at len(loader)
        return _StreamLoader(self, ds, length, track=(split == "train"))

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val") or []

    def test_dataloader(self):
        return self._loader("test") or []

    def predict_dataloader(self):
        return self._loader("predict") or []

    # ------------------------------------------------------------------ consumption tracking
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this right before a batch reaches the model (after its one-batch prefetch)."""
        if isinstance(batch, dict) and "_state" in batch:
            snap = batch.pop("_state")
            if self.trainer is not None and self.trainer.training:
                self._consume(snap)
                self._maybe_log()
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 clips become float [-1, 1] on the device they were moved to (see ``_convert_on_device``)."""
        return self.finish_batch(batch)

    def finish_batch(self, batch: Any) -> Any:
        """Idempotent: uint8 ``video`` -> float32 [-1, 1] unless ``float_output=False``."""
        if self.hparams.float_output and isinstance(batch, dict) and isinstance(batch.get("video"), torch.Tensor) \
                and batch["video"].dtype == torch.uint8:
            batch["video"] = to_float(batch["video"])
        return batch

    def _convert_on_device(self) -> bool:
        """Under Lightning on an accelerator the conversion waits until after the host->device copy."""
        tr = self.trainer
        return tr is not None and tr.strategy.root_device.type != "cpu"

    def _consume(self, snap: dict):
        st = self._train_state
        if snap["g"] != st["consumed"]:
            self._warn_once("order", f"data order check: got batch {snap['g']}, expected {st['consumed']} "
                            "(the resume position may be inexact)")
        st["workers"][int(snap["worker"])] = snap
        st["consumed"] += 1
        st["in_epoch"] += 1

    def data_counters(self) -> dict[str, int]:
        """Samples seen / used / skipped by reason on this rank (latest snapshot of every worker)."""
        total: dict[str, int] = {}
        for snap in self._train_state["workers"].values():
            for k, v in snap["counters"].items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
        total["bad"] = total.get("seen", 0) - total.get("ok", 0)
        return total

    def _maybe_log(self):
        tr = self.trainer
        every = max(1, getattr(tr, "log_every_n_steps", 50))
        if tr.logger is None or tr.global_rank != 0 or self._train_state["consumed"] % every:
            return
        c = self.data_counters()
        metrics = {f"data/{k}": float(v) for k, v in c.items()}
        metrics["data/epoch"] = float(self._train_state["epoch"])
        # the training losses' step axis (batches that stepped; a GAN's two optimizer steps per batch count once)
        loop = getattr(getattr(tr, "fit_loop", None), "epoch_loop", None)
        tr.logger.log_metrics(metrics, step=int(getattr(loop, "_batches_that_stepped", tr.global_step)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The training stream's resume position, every rank's.

        Under torch.distributed this is a collective (``all_gather_object``): call it on every rank, then save on
        rank 0. Calling it on rank 0 alone (inside ``if rank == 0:``) hangs. Lightning calls it on every rank."""
        local = dict(self._train_state)
        local["workers"] = {int(k): v for k, v in local["workers"].items()}
        rank, world = self._rank_world()
        ranks = [local]
        if world > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * world
            dist.all_gather_object(ranks, local)
        return {"format": STATE_FORMAT, "world_size": world, "num_workers": self.hparams.num_workers,
                "seed": self.hparams.seed, "ranks": ranks, "stages": self._stage_rows}

    def load_state_dict(self, state: dict) -> None:
        if not state or state.get("format") != STATE_FORMAT:
            self._warn_once("fmt", "datamodule state has an unknown format; starting the data stream fresh")
            return
        rank, world = self._rank_world()
        if state.get("stages") is not None:
            self.set_stages([{"start_batch": r[0], "num_frames": r[1], "resolution": [r[2], r[3]], "weights": r[4],
                              "fps_range": r[5] if len(r) > 5 else None} for r in state["stages"]])
        mismatch = []
        if state["world_size"] != world:
            mismatch.append(f"world_size {state['world_size']} -> {world}")
        if state["num_workers"] != self.hparams.num_workers:
            mismatch.append(f"num_workers {state['num_workers']} -> {self.hparams.num_workers}")
        if state["seed"] != self.hparams.seed:
            mismatch.append(f"seed {state['seed']} -> {self.hparams.seed}")
        mine = state["ranks"][rank] if rank < len(state["ranks"]) else state["ranks"][0]
        if mismatch:
            warnings.warn("exact data resume needs the same world size, workers and seed (" + ", ".join(mismatch) +
                          "); continuing from the next epoch with a fresh stream instead")
            self._train_state = _fresh_state()
            self._train_state["epoch"] = mine["epoch"] + 1
            return
        self._train_state = {**mine, "workers": {int(k): v for k, v in mine["workers"].items()}}

    def _warn_once(self, key: str, msg: str):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg)


class _StreamLoader:
    """Iterable over one split; builds a fresh DataLoader per iteration with the workers' resume positions."""

    def __init__(self, dm: VideoDataModule, ds: VideoStream, length: int | None, track: bool):
        self.dm, self.dataset, self.length, self.track = dm, ds, length, track

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("a resampled stream has no length")
        return self.length

    def __iter__(self):
        dm, ds, hp = self.dm, self.dataset, self.dm.hparams
        n = max(1, hp.num_workers)
        if self.track:
            st = dm._train_state
            if self.length is not None and st["in_epoch"] >= self.length:
                st["epoch"] += 1
                st["in_epoch"] = 0
            remaining = None if self.length is None else self.length - st["in_epoch"]
            offset = st["consumed"] % n
            ds.rotate = offset
            ds.quotas = None if remaining is None else split_quota(remaining, offset, n)
            ds.start_states = {int(k): v for k, v in st["workers"].items()}
        else:
            ds.rotate, ds.quotas, ds.start_states = 0, split_quota(self.length, 0, n), {}
        loader = DataLoader(ds, batch_size=None, num_workers=hp.num_workers, pin_memory=hp.pin_memory,
                            prefetch_factor=hp.prefetch_factor if hp.num_workers else None, persistent_workers=False)
        plain = dm.trainer is None
        on_device = dm._convert_on_device()
        for batch in loader:
            if not self.track:
                batch.pop("_state", None)
            elif plain:
                dm._consume(batch.pop("_state"))
            yield batch if on_device else dm.finish_batch(batch)


def _fresh_state() -> dict:
    return {"consumed": 0, "epoch": 0, "in_epoch": 0, "workers": {}}


def _check_fps_sampling(fps, fps_range, fps_beta):
    """Validated ``(fps_range, fps_beta)`` tuples for ``ClipSpec`` (None range: no per-clip fps sampling)."""
    if fps_range is None:
        if fps_beta is not None:
            raise DataConfigError("data.fps_beta needs data.fps_range (the interval the Beta draw is mapped to)")
        return None, (1.0, 1.0)
    if fps is not None:
        raise DataConfigError("give data.fps (one target rate) or data.fps_range (a per-clip draw), not both")
    if not (isinstance(fps_range, (list, tuple)) and len(fps_range) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in fps_range)
            and 0 < fps_range[0] <= fps_range[1]):
        raise DataConfigError(f"data.fps_range must be [lo, hi] with 0 < lo <= hi (Make-A-Video: [1, 30]), got {fps_range!r}")
    beta = (1.0, 1.0) if fps_beta is None else fps_beta
    if not (isinstance(beta, (list, tuple)) and len(beta) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in beta)):
        raise DataConfigError(f"data.fps_beta must be [a, b] with a, b > 0, got {fps_beta!r}")
    return (float(fps_range[0]), float(fps_range[1])), (float(beta[0]), float(beta[1]))


def _check_choice(key: str, value, allowed):
    if value not in allowed:
        raise DataConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _expand(spec, key: str) -> list[str]:
    """Shard urls of one setting; a file list among them is read now, so a missing column or a listed file that
    does not exist is a config error before any work."""
    try:
        urls = tario.expand_shards(spec, what=key)
        for u in urls:
            if tario.is_file_list(u):
                tario.list_listing(u)
        return urls
    except tario.ShardError as e:
        raise DataConfigError(str(e)) from e
    except FileListError as e:
        raise DataConfigError(f"{key}: {e}") from e
