"""Data counters are logged on the training losses' step axis (#11 §7): batches that stepped, not
``trainer.global_step``, which counts both optimizer steps of a GAN tokenizer's batch."""

from types import SimpleNamespace

import torch

from shardgen import write_shards
from vidgen.datamodules import VideoDataModule


class _Logger:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, metrics))


def test_data_counters_share_the_loss_step_axis(tmp_path):
    write_shards(str(tmp_path), n_shards=1, per_shard=6, frames=6)
    dm = VideoDataModule(train_shards=str(tmp_path), seed=0, num_frames=2, resolution=8, batch_size=2, num_workers=0)
    dm.setup("fit")
    logger = _Logger()
    loop = SimpleNamespace(_batches_that_stepped=0)
    dm.trainer = SimpleNamespace(training=True, logger=logger, global_rank=0, world_size=1, log_every_n_steps=1,
                                 global_step=0, strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                 fit_loop=SimpleNamespace(epoch_loop=loop))
    for i, batch in enumerate(dm.train_dataloader()):
        loop._batches_that_stepped = i  # what Lightning logs the losses of this batch at
        dm.trainer.global_step = 2 * i  # a GAN tokenizer: G and D steps
        dm.on_before_batch_transfer(batch, 0)
    assert [step for step, _ in logger.calls] == [0, 1, 2]
    assert logger.calls[-1][1]["data/ok"] == 6.0 and logger.calls[-1][1]["data/seen"] == 6.0
