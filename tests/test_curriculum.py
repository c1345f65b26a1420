"""StagedCurriculum: data mixture / clip length switch at the exact batch, parameter freezing, a non-compounding LR
multiplier, and resume inside a later stage (in-process Trainer on tiny shards)."""

import logging

import lightning as L
import pytest
import torch

from vidgen.callbacks.curriculum import CurriculumConfigError, StagedCurriculum
from vidgen.datamodules.video import VideoDataModule
from vidgen.lightning_modules.stream_probe import StreamProbe
from shardgen import write_shards


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cur")
    write_shards(str(root / "a"), n_shards=2, per_shard=6, frames=8, prefix="a", caption=False)
    write_shards(str(root / "b"), n_shards=2, per_shard=6, frames=8, prefix="b", caption=False, seed=100)
    return str(root / "a"), str(root / "b")


class RecAdam(torch.optim.Adam):
    """Adam that records the LR it steps with (inside step(), i.e. after the curriculum's pre-hook)."""

    def step(self, closure=None):
        self.seen_lr.append(self.param_groups[0]["lr"])
        return super().step(closure)


class Probe(StreamProbe):
    """StreamProbe recording, per training step, the keys, clip length, weights and the curriculum stage."""

    def __init__(self, **kw):
        super().__init__(channels=4, lr=0.05, **kw)
        self.seen, self.weights, self.opt_lrs = [], [], []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, [k.split("-")[0] for k in batch["key"]], batch["video"].shape[2]))
        self.weights.append({n: p.detach().clone() for n, p in self.named_parameters()})
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = RecAdam(self.parameters(), lr=self.hparams.lr)
        opt.seen_lr = self.opt_lrs
        # ExponentialLR is chainable (reads the group's current lr): a scale left in place would compound
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
                                                   "interval": "step"}}


STAGES = [
    {"name": "videos_a", "weights": [1.0, 0.0], "num_frames": 2},
    {"name": "b_temporal", "at_step": 3, "weights": {"a": 0.0, "b": 1.0}, "num_frames": 4,
     "trainable": [r"^dec\."], "lr_scale": 0.5},
]


def _dm(shards, workers=0):
    a, b = shards
    return VideoDataModule(sources=[{"shards": a, "name": "a"}, {"shards": b, "name": "b"}], seed=3, num_frames=2,
                           resolution=16, batch_size=2, num_workers=workers, crop="center")


def _trainer(tmp_path, steps, cb, accumulate=1):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                     accumulate_grad_batches=accumulate, default_root_dir=str(tmp_path), num_sanity_val_steps=0)


def _fit(tmp_path, shards, steps, ckpt_in=None, ckpt_out=None):
    torch.manual_seed(0)
    model, cb = Probe(), StagedCurriculum(STAGES)
    tr = _trainer(tmp_path, steps, cb)
    tr.fit(model, datamodule=_dm(shards), ckpt_path=ckpt_in)
    if ckpt_out:
        tr.save_checkpoint(ckpt_out)
    return model, cb, tr


def _expected_lrs(n, start=0):
    return [0.05 * 0.9**s * (1.0 if s < 3 else 0.5) for s in range(start, n)]


def _check_stream(seen, start=0):
    for step, srcs, t in seen:
        want = ("a", 2) if step < 3 else ("b", 4)
        assert set(srcs) == {want[0]} and t == want[1], f"step {step}: sources {srcs}, T={t}, expected {want}"
    assert [s for s, _, _ in seen] == list(range(start, start + len(seen)))


@pytest.fixture(scope="module")
def full_run(two_sources, tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("full"), two_sources, 6)


def test_stage_switch_data_freezing_lr(full_run, caplog):
    model, cb, tr = full_run
    _check_stream(model.seen)
    w = model.weights  # w[s] = weights before step s
    for name in ("enc.weight", "enc.bias"):
        assert not torch.equal(w[0][name], w[3][name]), "stage 0 trains the encoder"
        for s in (4, 5):
            assert torch.equal(w[3][name], w[s][name]), f"{name} must stay frozen in stage 1 (step {s})"
    for name in ("dec.weight",):
        assert not torch.equal(w[3][name], w[5][name]), "the decoder keeps training in stage 1"
    assert model.opt_lrs == pytest.approx(_expected_lrs(6)), "lr_scale applied in stage 1 only, never compounded"
    # the scheduler / checkpoint see the unscaled LR
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**6)
    assert cb.current_stage == 1
    assert tr.callback_metrics["curriculum/stage"] == 1.0
    assert tr.callback_metrics["curriculum/lr_scale"] == 0.5


def test_transition_is_logged(two_sources, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model, cb, tr = _fit(tmp_path, two_sources, 4)
    lines = [r.getMessage() for r in caplog.records if "curriculum:" in r.getMessage()]
    assert any("step 0" in m and "stage 0 (videos_a)" in m for m in lines), lines
    assert any("step 3" in m and "stage 1 (b_temporal)" in m and "num_frames=4" in m for m in lines), lines


def test_resume_inside_stage_two(two_sources, full_run, tmp_path):
    ckpt = str(tmp_path / "k4.ckpt")
    first, _, _ = _fit(tmp_path, two_sources, 4, ckpt_out=ckpt)  # stops at step 4, inside stage 1
    model, cb, tr = _fit(tmp_path, two_sources, 6, ckpt_in=ckpt)
    assert cb.current_stage == 1
    assert [s for s, _, _ in model.seen] == [4, 5]
    _check_stream(model.seen, start=4)
    full = full_run[0]
    assert [k for _, k, _ in model.seen] == [k for _, k, _ in full.seen[4:]]
    assert model.opt_lrs == pytest.approx(_expected_lrs(6, start=4)), "resumed LR: scaled once, not compounded"
    for s, ws in enumerate(model.weights):
        assert torch.equal(ws["enc.weight"], first.weights[3]["enc.weight"]), "encoder still frozen after resume"
        for n in ws:
            assert torch.allclose(ws[n], full.weights[4 + s][n], atol=1e-6), f"resumed weights differ: {n}"
    assert not torch.equal(model.weights[0]["dec.weight"], model.weights[1]["dec.weight"])


def test_accumulation_and_workers(two_sources, tmp_path):
    """With accumulate_grad_batches=2 a boundary at step 2 is batch 4; loader workers read the change."""
    model = Probe()
    cb = StagedCurriculum([{"weights": [1, 0]}, {"at_fraction": 0.5, "weights": [0, 1], "num_frames": 4}])
    tr = _trainer(tmp_path, 4, cb, accumulate=2)
    tr.fit(model, datamodule=_dm(two_sources, workers=1))
    got = [(srcs[0], t) for _, srcs, t in model.seen]
    assert got == [("a", 2)] * 4 + [("b", 4)] * 4, got


def test_config_errors(two_sources, tmp_path):
    with pytest.raises(CurriculumConfigError, match="unknown keys"):
        StagedCurriculum([{"at_step": 0, "mixture": [1, 0]}])
    with pytest.raises(CurriculumConfigError, match="must increase"):
        StagedCurriculum([{"at_step": 0}, {"at_step": 5}, {"at_step": 5}])
    with pytest.raises(CurriculumConfigError, match="needs a boundary"):
        StagedCurriculum([{"at_step": 0}, {"lr_scale": 2}])
    with pytest.raises(CurriculumConfigError, match="lr_scale"):
        StagedCurriculum([{"lr_scale": -1}])
    with pytest.raises(CurriculumConfigError, match="regular expression"):
        StagedCurriculum([{"trainable": ["("]}])
    with pytest.raises(CurriculumConfigError, match=r"sources \['a', 'b'\]"):
        _trainer(tmp_path, 2, StagedCurriculum([{"weights": [1, 0, 0]}])).fit(Probe(), datamodule=_dm(two_sources))
    with pytest.raises(CurriculumConfigError, match="matches no parameter"):
        _trainer(tmp_path, 2, StagedCurriculum([{"trainable": ["temporal"]}])).fit(Probe(), datamodule=_dm(two_sources))


def test_fraction_and_implicit_first_stage(tmp_path):
    cb = StagedCurriculum([{"at_fraction": 0.25, "frozen": ["enc"]}, {"at_step": 6, "frozen": []}])
    tr = L.Trainer(accelerator="cpu", max_steps=8, logger=False)
    cb.setup(tr, Probe(), "fit")
    assert [cb.stage_at(s) for s in range(8)] == [0, 0, 1, 1, 1, 1, 2, 2]  # implicit stage 0, 25% of 8 = step 2


def test_ddp_needs_find_unused_parameters():
    from lightning.pytorch.strategies import DDPStrategy

    class T:
        strategy = DDPStrategy(find_unused_parameters=False)

    with pytest.raises(CurriculumConfigError, match="find_unused_parameters: true"):
        StagedCurriculum._check_strategy(T())
    T.strategy = DDPStrategy(find_unused_parameters=True)
    StagedCurriculum._check_strategy(T())
