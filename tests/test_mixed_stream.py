"""A source that mixes videos and stills (issue 9 §1): several epochs, 0 and 2 workers, 1 and 2 ranks, and an exact
mid-epoch resume whose saved state holds samples waiting in buckets."""

import copy

import pytest
import torch

from vidgen.datamodules import VideoDataModule
from shardgen import write_shards


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    write_shards(str(d), n_shards=2, per_shard=9, frames=10, images_every=3)  # every third sample is a png
    return str(d)


def make(shards, workers, rank, world):
    dm = VideoDataModule(train_shards=shards, seed=1, num_frames=4, resolution=16, batch_size=3, num_workers=workers,
                         rank=rank, world_size=world, prefetch_factor=1)
    dm.setup("fit")
    return dm


def take(dm, n, states=None):
    """Keys, clip lengths and the clips themselves (video, fps) of the next ``n`` batches, re-iterating across epochs
    like a trainer; ``states`` collects the datamodule state after each batch."""
    out = []
    while len(out) < n:
        for b in dm.train_dataloader():
            out.append((tuple(b["key"]), b["video"].shape[2], b["video"], b["fps"]))
            if states is not None:
                states.append(copy.deepcopy(dm.state_dict()))
            if len(out) == n:
                break
    return out


def held(state) -> int:
    return sum(len(refs) for w in state["ranks"][0]["workers"].values() for _, refs in w["pending"])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_mixed_stream_runs_epochs_and_resumes_with_held_samples(mixed, workers, world):
    for rank in range(world):
        per_epoch = len(make(mixed, workers, rank, world).train_dataloader())
        total = 3 * per_epoch + 1  # three epoch boundaries
        states = []
        full = take(make(mixed, workers, rank, world), total, states)
        assert {x[1] for x in full} == {1, 4}, "both stills and clips must come through"
        # resume after the second epoch boundary, at the first mid-epoch point whose state holds bucketed samples
        k = next((k for k in range(per_epoch + 1, total) if k % per_epoch and held(states[k - 1])), None)
        assert k is not None, "no mid-epoch resume point with held samples"
        dm2 = make(mixed, workers, rank, world)
        dm2.load_state_dict(states[k - 1])
        resumed = full[:k] + take(dm2, total - k)
        assert [x[:2] for x in resumed] == [x[:2] for x in full]
        assert all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) for a, b in zip(resumed, full)), \
            "same keys, but the resumed clips differ"
