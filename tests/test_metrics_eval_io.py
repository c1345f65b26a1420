"""`vidgen eval` reading generated clips from shards: metrics without a frame protocol (CLIPSIM, accuracy) see every
frame of a clip, as they do from a samples.npz; IS's protocol takes the first frames."""

import shardgen
from vidgen.eval import iter_fake


def test_iter_fake_from_shards_decodes_whole_clips(tmp_path):
    shardgen.write_shards(str(tmp_path), 1, 3, frames=11, seed=0)
    clips = list(iter_fake(str(tmp_path), None, None))
    assert [c[0] for c in clips] == [0, 1, 2]
    assert all(c[1].shape == (11, 24, 32, 3) and c[3] == f"sample {c[0]}" and c[4] is None for c in clips)
    first = list(iter_fake(str(tmp_path), 4, 2))
    assert [c[1].shape[0] for c in first] == [4, 4]
    assert (first[0][1] == clips[0][1][:4]).all()
