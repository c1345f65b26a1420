"""``vidgen.runtime.RNGStateCheckpoint`` (added by the CLI to every run): a resumed run draws the random numbers the
uninterrupted run would have drawn, from python's ``random``, numpy's global generator and torch's CPU generator."""

import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from vidgen.runtime import AtomicCheckpointIO, LastCheckpoint, PreemptionCheckpoint, RNGStateCheckpoint


def _draws():
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.randn(4).tolist()


def test_saved_state_gives_the_same_draws_after_loading(tmp_path):
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    cb = RNGStateCheckpoint()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    np.random.randn()  # numpy keeps a cached Gaussian between draws: state with one pending
    ckpt = {}
    cb.on_save_checkpoint(trainer, None, ckpt)
    # through a file, as a resume reads it: checkpoints are loaded weights-only
    torch.save(ckpt, tmp_path / "rng.ckpt")
    ckpt = torch.load(tmp_path / "rng.ckpt", weights_only=True)
    first = [_draws() for _ in range(3)]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # a fresh process seeds as it likes
    assert [_draws() for _ in range(3)] != first  # (the check below can fail)
    cb.on_load_checkpoint(trainer, None, ckpt)
    assert [_draws() for _ in range(3)] == first

    # each generator is restored, not just one of them
    for name, draw in (("python", random.random), ("numpy", np.random.rand), ("torch", lambda: torch.rand(1).item())):
        cb.on_load_checkpoint(trainer, None, ckpt)
        a = draw()
        cb.on_load_checkpoint(trainer, None, ckpt)
        random.random(), np.random.rand(), torch.rand(1)  # moves all three on: only the restore brings them back
        cb.on_load_checkpoint(trainer, None, ckpt)
        assert draw() == a, name


def test_a_checkpoint_without_rng_state_or_from_other_ranks_leaves_the_generators_alone():
    cb = RNGStateCheckpoint()
    torch.manual_seed(0)
    saved = {}
    cb.on_save_checkpoint(SimpleNamespace(world_size=1, global_rank=0), None, saved)
    torch.manual_seed(5)
    want = torch.get_rng_state()
    cb.on_load_checkpoint(SimpleNamespace(world_size=1, global_rank=0), None, {})
    cb.on_load_checkpoint(SimpleNamespace(world_size=2, global_rank=0), None, saved)  # rank count changed: warns
    assert torch.equal(torch.get_rng_state(), want)


class NoisyRegression(L.LightningModule):
    """A step that draws from all three global generators, as diffusion noise, masking ratios and dropout do."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x = torch.randn(8, 4)
        scale = 1.0 + random.random() + float(np.random.rand())
        return ((self.lin(x) - scale * x.sum(1, keepdim=True)) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        # the batches carry nothing the step reads; the loader's own seed comes from its generator, not torch's
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(64, 1)), batch_size=1,
                                           generator=torch.Generator().manual_seed(0))


def _fit(run_dir, max_steps, ckpt_path=None, restore_rng=True):
    """A run as ``vidgen fit`` sets it up: seed_everything, then the CLI's checkpoint callbacks and checkpoint IO
    (vidgen/cli.py ``_instantiate_trainer``), checkpoints every 3 steps."""
    L.seed_everything(0, verbose=False)
    model = NoisyRegression()
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [LastCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                                every_n_train_steps=3, save_top_k=-1, save_last=True, enable_version_counter=False),
                 PreemptionCheckpoint(str(ckpt_dir / "last.ckpt"))]
    if restore_rng:
        callbacks.append(RNGStateCheckpoint())
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run_dir, num_sanity_val_steps=0)
    trainer.fit(model, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore:.*resum.*")
def test_resumed_noisy_training_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    whole = _fit(tmp_path / "whole", 6)
    mid = tmp_path / "whole" / "checkpoints" / "step00000003.ckpt"
    assert mid.exists()
    resumed = _fit(tmp_path / "resumed", 6, ckpt_path=str(mid))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "resume drew other random numbers"
    # control: without the callback the resumed run redraws the first steps' noise (seed_everything at start) and
    # ends elsewhere, so the equality above is the callback's doing
    unrestored = _fit(tmp_path / "unrestored", 6, ckpt_path=str(mid), restore_rng=False)
    assert not all(torch.equal(whole[k], unrestored[k]) for k in whole)
