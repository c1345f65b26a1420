"""``log_step``: the loggers receive exactly what per-step ``self.log`` gives them, with ``self.log`` called for the
breakdown only on the batches they write (and a key's first batch)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from vidgen.lightning_modules.nn.step_logs import log_step


class Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, {k: round(float(v), 6) for k, v in metrics.items() if k != "epoch"}))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Tiny(L.LightningModule):
    def __init__(self, use_log_step: bool):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.use_log_step = use_log_step
        self.calls = []

    def log(self, name, *args, **kwargs):
        self.calls.append((self.global_step, name))
        return super().log(name, *args, **kwargs)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).square().mean()
        metrics = {"train/loss": loss, "train/step": torch.tensor(float(self.global_step)), "train/twice": 2 * loss}
        if self.global_step >= 4:  # a key that appears late (a GAN term after its start step)
            metrics["train/late"] = torch.tensor(float(self.global_step) + 0.5)
        if self.global_step % 3 == 0:  # a key of some steps only (VideoPoet's per-task loss)
            metrics["train/some"] = torch.tensor(float(self.global_step) + 0.25)
        if self.use_log_step:
            log_step(self, metrics, batch.shape[0])
        else:
            for k, v in metrics.items():
                self.log(k, v, prog_bar=k == "train/loss", batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(use_log_step: bool, steps: int = 11, every: int = 3, epoch: int = 100):
    torch.manual_seed(0)
    model, rec = Tiny(use_log_step), Recorder()
    data = [torch.randn(2, 4) for _ in range(min(steps, epoch))]
    trainer = L.Trainer(max_steps=steps, logger=rec, log_every_n_steps=every, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=None))
    return model, rec, trainer


@pytest.mark.parametrize("steps,every,epoch", [(11, 3, 100), (23, 4, 6), (12, 5, 5)])
def test_loggers_receive_what_per_step_logging_gives_them(steps, every, epoch):
    m_all, rec_all, tr_all = _fit(False, steps, every, epoch)
    m_due, rec_due, tr_due = _fit(True, steps, every, epoch)
    assert rec_due.rows == rec_all.rows and len(rec_all.rows) >= 2
    assert {k for _, r in rec_all.rows for k in r} >= {"train/loss", "train/step", "train/twice", "train/late"}
    assert any("train/some" in r and r["train/some"] != r["train/step"] + 0.25 for _, r in rec_all.rows)  # stale
    assert set(tr_due.callback_metrics) == set(tr_all.callback_metrics)
    assert float(tr_due.callback_metrics["train/loss"]) == float(tr_all.callback_metrics["train/loss"])
    assert len(m_due.calls) < len(m_all.calls) * 0.7


def test_the_breakdown_is_logged_on_written_batches_and_first_appearances_only():
    m, rec, _ = _fit(True)
    steps_of = lambda key: [s for s, k in m.calls if k == key]  # noqa: E731
    assert steps_of("train/loss") == list(range(11))  # the progress-bar key: every step
    # batches 3, 6, 9 (1-based) reach the loggers: global steps 2, 5, 8; step 0 is each key's first appearance
    assert steps_of("train/step") == [0, 2, 5, 8]
    assert steps_of("train/late") == [4, 5, 8]
    assert steps_of("train/some") == [0, 5, 8]  # step 3's and 6's values go out with steps 5 and 8
    assert len(m.calls) == 11 + 4 + 4 + 3 + 3  # against 11 * 3 + 7 + 4 = 44 with self.log every step


def test_outside_a_trainer_every_key_is_logged():
    m = Tiny(True)
    seen = []
    m.log = lambda name, value, **kw: seen.append(name)  # a module without a trainer: nothing to skip for
    log_step(m, {"train/loss": 1.0, "train/a": 2.0}, 1)
    log_step(m, {"train/loss": 1.0, "train/a": 2.0}, 1)
    assert seen == ["train/loss", "train/a"] * 2
