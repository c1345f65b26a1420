"""TrajError in `vidgen eval` (Tora §4.7, issue 12 §4): trajectories read from samples.npz as the prediction writer
stores them; 0 for a clip rendered along its trajectory, growing when the requested trajectory drifts."""

import json

import numpy as np
import pytest
import torch

from test_tora import _render_along
from vidgen.lightning_modules.nn.trajectory import traj_error


def _samples(tmp_path, shifts, with_trajectories=True):
    """Two clips rendered along their own path, written by the PredictionWriter as Tora's predictions; the
    requested trajectories drift by ``shift`` px in x by the last frame, a NaN row pads the objects ([B, N, T, 2])."""
    T = 9
    paths = [np.stack([16.0 + 3 * np.arange(T), 20.0 + 1.5 * np.arange(T)], 1),
             np.stack([40.0 - 2 * np.arange(T), 30.0 + np.zeros(T)], 1)]
    videos = torch.stack([_render_along(p) for p in paths])  # [2, 3, T, 64, 64] in [-1, 1]
    requested = np.full((2, 2, T, 2), np.nan, np.float32)
    for i, (p, s) in enumerate(zip(paths, shifts)):
        requested[i, 0] = p + np.stack([s * np.arange(T) / (T - 1), np.zeros(T)], 1)
    from types import SimpleNamespace

    from vidgen.callbacks.prediction_writer import PredictionWriter

    out = tmp_path / "_".join(map(str, shifts)) / ("traj" if with_trajectories else "bare")
    pred = {"videos": videos, "keys": ["a", "b"]}
    if with_trajectories:
        pred["trajectories"] = torch.from_numpy(requested)  # what Tora's predict_step returns
    writer, trainer = PredictionWriter(str(out), per_sample=False, grids=False), SimpleNamespace(global_rank=0,
                                                                                                 world_size=1)
    writer.write_on_batch_end(trainer, None, pred, None, None, 0, 0)
    writer.on_predict_epoch_end(trainer, None)
    path = out / "samples.npz"
    return str(path), videos, requested


def _eval(path, tmp_path):
    from vidgen.eval import main

    assert main(["--metrics", "trajerror", "--fake", path, "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    return json.load(open(tmp_path / "r.json"))["trajerror"]


def test_eval_trajerror_from_samples_npz(tmp_path, capsys):
    path, _, _ = _samples(tmp_path, (0.0, 0.0))
    exact = _eval(path, tmp_path)
    assert exact["n"] == 2 and exact["points"] == 2 * 8 and exact["value"] < 0.5  # NaN rows skipped, frames 1..T-1
    path, videos, requested = _samples(tmp_path, (6.0, -6.0))
    drifted = _eval(path, tmp_path)
    total = [traj_error(v, r) for v, r in zip(videos, requested)]  # the one TrajError (nn.trajectory), per clip
    assert drifted["value"] == pytest.approx(sum(s for s, _ in total) / sum(n for _, n in total), abs=0.02)  # uint8
    assert drifted["value"] > exact["value"] + 1.5
    assert "TrajError" in capsys.readouterr().out
    bare, _, _ = _samples(tmp_path, (1.0, 1.0), with_trajectories=False)
    with pytest.raises(SystemExit, match="no 'trajectories'"):
        _eval(bare, tmp_path)
    from vidgen.eval import main

    with pytest.raises(SystemExit):
        main(["--metrics", "trajerror", "--fake", str(tmp_path)])
    assert "needs --fake samples.npz" in capsys.readouterr().err


def test_writer_draws_requested_trajectories_over_the_grid_only(tmp_path):
    """Tora's predictions carry ``trajectories``: the grid shows each sample with its requested path drawn
    (``nn.trajectory.draw_trajectories``), while ``samples.npz`` keeps the clean videos and the paths themselves."""
    from types import SimpleNamespace

    from PIL import Image

    from vidgen.callbacks.prediction_writer import PredictionWriter
    from vidgen.datamodules import media

    T = 4
    videos = torch.full((1, 3, T, 32, 32), -1.0)  # black clips: any drawn pixel shows
    path = np.full((1, 2, T, 2), np.nan, np.float32)
    path[0, 0] = np.stack([8.0 + 4 * np.arange(T), np.full(T, 16.0)], 1)  # one object moving right along y = 16
    grids = {}
    runs = (("bare", None, None), ("traj", torch.from_numpy(path), None),
            ("bare_cond", None, videos), ("traj_cond", torch.from_numpy(path), videos))  # I2V-style condition rows
    for name, trajs, cond in runs:
        pred = {"videos": videos, "keys": ["a"], **({"trajectories": trajs} if trajs is not None else {}),
                **({"cond_videos": cond} if cond is not None else {})}
        writer = PredictionWriter(str(tmp_path / name), per_sample=False, grids=True)
        trainer = SimpleNamespace(global_rank=0, world_size=1)
        writer.write_on_batch_end(trainer, None, pred, None, None, 0, 0)
        writer.on_predict_epoch_end(trainer, None)
        grids[name] = np.asarray(Image.open(tmp_path / name / "grid_r0_00000.png").convert("RGB"))
        npz = np.load(tmp_path / name / "samples.npz")
        assert (npz["videos"] == media.to_uint8(videos.permute(0, 2, 3, 4, 1).numpy())).all()  # undrawn
    drawn = (grids["traj"] != grids["bare"]).any(-1)
    assert 4 <= drawn.sum() and (grids["traj"][drawn] == 255).all()  # the path is drawn, white (the first track)
    drawn_cond = (grids["traj_cond"] != grids["bare_cond"]).any(-1)  # also below the conditioning rows
    assert drawn_cond.sum() == drawn.sum() and (grids["traj_cond"][drawn_cond] == 255).all()
    assert np.allclose(np.load(tmp_path / "traj" / "samples.npz")["trajectories"], path, equal_nan=True)
