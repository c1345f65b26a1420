"""EMA math (closed forms, warmup, every_n_steps, start_step), buffer layout, weight swapping and checkpoints.

Single process. Resume under DDP and FSDP2 (2 gloo processes) is tested in tests/test_fsdp.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402

from vidgen.callbacks.ema import EMA, EMA_PREFIX, EMAShadow, ema_decay, ema_state_dict, ema_weights, raw_state_dict  # noqa: E402


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("bias", torch.full((2,), 0.1))
        self.val_losses: list[float] = []

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x) * self.frozen + self.bias, y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.val_losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.2)


def _data(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ds = [(torch.randn(3, generator=g), torch.randn(2, generator=g)) for _ in range(n)]
    return torch.utils.data.DataLoader(ds, batch_size=2)


def _set_params(module: nn.Module, value_fn) -> None:
    with torch.no_grad():
        for i, (_, p) in enumerate(module.named_parameters()):
            if p.requires_grad:
                p.copy_(value_fn(i, p))


# ---------------------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------------------
def test_decay_schedule():
    assert ema_decay(1, 0.99) == 0.99 and ema_decay(1000, 0.99) == 0.99
    assert ema_decay(0, 0.99) == 0.0  # no update before the first optimizer step
    # linear ramp over warmup_steps optimizer steps
    assert [ema_decay(g, 0.9, warmup_steps=4) for g in (1, 2, 4, 8)] == pytest.approx([0.225, 0.45, 0.9, 0.9])
    # counted from start_step; nothing (copy) until then
    assert ema_decay(10, 0.9, warmup_steps=4, start_step=10) == 0.0
    assert ema_decay(12, 0.9, warmup_steps=4, start_step=10) == pytest.approx(0.45)


def test_closed_form_constant_params():
    """Constant weights w, EMA started at s0: after k updates s_k = w + d^k (s0 - w)."""
    torch.manual_seed(0)
    net, ema = Net(), EMA(decay=0.7)
    shadow = ema.attach(net)
    s0 = {n: shadow.get_buffer(n).clone() for n in shadow.param_names}
    _set_params(net, lambda i, p: torch.full_like(p, float(i + 1)))
    for g in range(1, 6):
        assert ema.step(net, g)
    params = dict(net.named_parameters())
    for n in shadow.param_names:
        w = params[n].detach()
        torch.testing.assert_close(shadow.get_buffer(n), w + 0.7**5 * (s0[n] - w), rtol=0, atol=1e-6)


def test_known_sequence_with_warmup():
    """w_g = g * c with the linear warmup: s_G = prod(d) s_0 + sum_g (1 - d_g) prod_{j>g} d_j  g c."""
    torch.manual_seed(0)
    net, ema = Net(), EMA(decay=0.9, warmup_steps=3)
    shadow = ema.attach(net)
    params = dict(net.named_parameters())
    c = {n: torch.randn_like(params[n]) for n in shadow.param_names}
    s0 = {n: shadow.get_buffer(n).double().clone() for n in shadow.param_names}
    G = 7
    for g in range(1, G + 1):
        with torch.no_grad():
            for n in shadow.param_names:
                params[n].copy_(g * c[n])
        assert ema.step(net, g)
    ds = [0.9 * min(1.0, g / 3) for g in range(1, G + 1)]  # 0.3, 0.6, 0.9, 0.9, ...
    coef = sum((1 - ds[g - 1]) * math.prod(ds[g:]) * g for g in range(1, G + 1))
    for n in shadow.param_names:
        closed = math.prod(ds) * s0[n] + coef * c[n].double()
        torch.testing.assert_close(shadow.get_buffer(n).double(), closed, rtol=0, atol=1e-6)


def test_every_n_steps_and_repeated_calls():
    torch.manual_seed(0)
    net, ema = Net(), EMA(decay=0.5, every_n_steps=3)
    shadow = ema.attach(net)
    first = shadow.param_names[0]
    values = []
    for g in range(1, 8):
        _set_params(net, lambda i, p, g=g: torch.full_like(p, float(g)))
        updated = ema.step(net, g)
        assert updated == (g % 3 == 0), g
        assert not ema.step(net, g)  # same global step again (gradient accumulation): no second update
        values.append(shadow.get_buffer(first).flatten()[0].item())
    s0 = values[0]
    assert values[:2] == [s0, s0]
    assert values[2] == pytest.approx(0.5 * s0 + 0.5 * 3)
    assert values[5] == pytest.approx(0.5 * values[2] + 0.5 * 6)
    # a jump over a multiple (manual optimization: 2 optimizer steps per batch) still updates once
    ema2 = EMA(decay=0.5, every_n_steps=3)
    ema2.attach(net)
    assert [ema2.step(net, g) for g in (2, 4, 6, 8)] == [False, True, True, False]


def test_start_step_tracks_raw_weights():
    torch.manual_seed(0)
    net, ema = Net(), EMA(decay=0.9, start_step=3)
    shadow = ema.attach(net)
    first = shadow.param_names[0]
    for g in range(1, 4):
        _set_params(net, lambda i, p, g=g: torch.full_like(p, float(g)))
        ema.step(net, g)
        assert torch.equal(shadow.get_buffer(first), torch.full_like(shadow.get_buffer(first), float(g)))
    _set_params(net, lambda i, p: torch.full_like(p, 10.0))
    ema.step(net, 4)
    assert shadow.get_buffer(first).flatten()[0].item() == pytest.approx(0.9 * 3 + 0.1 * 10)


# ---------------------------------------------------------------------------------------------------------
# layout and swapping
# ---------------------------------------------------------------------------------------------------------
def test_buffers_map_one_to_one_and_stay_out_of_the_optimizer():
    net = Net()
    n_params = len(list(net.parameters()))
    EMA.attach(net)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    ema_keys = [k for k in net.state_dict() if k.startswith(EMA_PREFIX)]
    assert ema_keys == [EMA_PREFIX + n for n in trainable]  # frozen parameter and buffers have no EMA
    assert len(list(net.parameters())) == n_params  # optimizer/autograd never see them
    assert all(not b.requires_grad for n, b in net.named_buffers() if n.startswith(EMA_PREFIX))
    assert sorted(net._ddp_params_and_buffers_to_ignore) == sorted(ema_keys)
    EMA.detach(net)
    assert not any(k.startswith(EMA_PREFIX) for k in net.state_dict())
    assert net._ddp_params_and_buffers_to_ignore == []


def test_ema_weights_context_manager():
    torch.manual_seed(0)
    net, ema = Net(), EMA(decay=0.5)
    with ema_weights(net) as active:  # no EMA attached: no-op
        assert active is False
    shadow = ema.attach(net)
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    _set_params(net, lambda i, p: p + 1.0)
    ema.step(net, 1)
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema_weights(net) as active:
        assert active
        for n in shadow.param_names:
            assert torch.equal(dict(net.named_parameters())[n], shadow.get_buffer(n))
        with ema_weights(net):  # re-entrant
            pass
        assert shadow.swapped
        with pytest.raises(RuntimeError, match="swapped in"):
            shadow.update(net, 0.5)
    assert not shadow.swapped
    for n, p in net.named_parameters():
        assert torch.equal(p, raw[n])
    with ema_weights(net, enabled=False) as active:
        assert active is False


def test_ema_state_dict_and_fallback():
    net = Net()
    shadow = EMA.attach(net)
    with torch.no_grad():
        for n in shadow.param_names:
            shadow.get_buffer(n).fill_(7.0)
    ckpt = {"state_dict": net.state_dict(), "global_step": 3}
    sd = ema_state_dict(ckpt)
    assert set(sd) == set(Net().state_dict())  # the model's own names
    assert torch.all(sd["body.0.weight"] == 7.0) and torch.equal(sd["frozen"], net.frozen)
    assert set(raw_state_dict(ckpt)) == set(sd)
    Net().load_state_dict(sd)  # a bare model loads it
    with pytest.warns(UserWarning, match="no EMA"):
        fallback = ema_state_dict(raw_state_dict(ckpt))
    assert torch.equal(fallback["body.0.weight"], net.body[0].weight)


# ---------------------------------------------------------------------------------------------------------
# with a Trainer (single CPU process)
# ---------------------------------------------------------------------------------------------------------
def _trainer(tmp_path, callbacks, max_steps=4, **kw):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **kw,
    )


def _loss_with(state: dict, batch) -> float:
    m = Net()
    m.load_state_dict(state)
    with torch.no_grad():
        return float(m.loss(batch))


def test_fit_validates_with_ema_and_checkpoints_it(tmp_path):
    L.seed_everything(0, verbose=False)
    net = Net()
    trainer = _trainer(tmp_path, [EMA(decay=0.5)], enable_checkpointing=False)
    trainer.fit(net, _data(), _data(2, seed=1))  # 2 steps per epoch, validation after each epoch
    ckpt_path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert any(k.startswith(EMA_PREFIX) for k in ckpt["state_dict"])
    assert not any(isinstance(v, torch.Tensor) for v in ckpt["callbacks"]["EMA"].values())
    val_batch = next(iter(_data(2, seed=1)))
    assert net.val_losses[-1] == pytest.approx(_loss_with(ema_state_dict(ckpt), val_batch), abs=1e-6)
    assert net.val_losses[-1] != pytest.approx(_loss_with(raw_state_dict(ckpt), val_batch), abs=1e-4)
    for n, p in net.named_parameters():  # raw weights back after validation
        assert torch.equal(p, ckpt["state_dict"][n])

    # validate a fresh module from the checkpoint: EMA restored and used; or the raw weights when asked
    fresh = Net()
    _trainer(tmp_path, [EMA(decay=0.5)]).validate(fresh, _data(2, seed=1), ckpt_path=ckpt_path, verbose=False)
    assert fresh.val_losses[-1] == pytest.approx(net.val_losses[-1], abs=1e-6)
    raw_eval = Net()
    _trainer(tmp_path, [EMA(decay=0.5, use_ema_for_eval=False)]).validate(
        raw_eval, _data(2, seed=1), ckpt_path=ckpt_path, verbose=False
    )
    assert raw_eval.val_losses[-1] == pytest.approx(_loss_with(raw_state_dict(ckpt), val_batch), abs=1e-6)


def test_resume_exact_and_without_ema_keys(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # (a checkpoint taken by trainer.save_checkpoint after fit() stopped at max_steps does not resume the data
    # stream exactly in Lightning 2.6; one written during training does)
    L.seed_everything(0, verbose=False)
    full = Net()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="k", every_n_train_steps=2, save_top_k=1, monitor="step", mode="min")
    t = _trainer(tmp_path / "full", [EMA(decay=0.6, warmup_steps=2), saver], max_steps=4)
    t.fit(full, _data())

    resumed = Net()
    t = _trainer(tmp_path / "res", [EMA(decay=0.6, warmup_steps=2)], max_steps=4, enable_checkpointing=False)
    t.fit(resumed, _data(), ckpt_path=tmp_path / "k.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)

    # a checkpoint without EMA entries: warns, trains, EMA starts from the restored weights
    ckpt = torch.load(tmp_path / "k.ckpt", weights_only=False)
    ckpt["state_dict"] = raw_state_dict(ckpt)
    torch.save(ckpt, tmp_path / "k_noema.ckpt")
    ema = EMA(decay=0.6, warmup_steps=2)
    no_ema = Net()
    t = _trainer(tmp_path / "noema", [ema], max_steps=4, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="has no EMA weights"):
        t.fit(no_ema, _data(), ckpt_path=tmp_path / "k_noema.ckpt")
    for n, p in no_ema.named_parameters():  # raw training identical
        torch.testing.assert_close(p, dict(full.named_parameters())[n], rtol=0, atol=1e-7)
    assert isinstance(no_ema._ema, EMAShadow)
    assert not torch.equal(no_ema._ema.get_buffer("body.0.weight"), full._ema.get_buffer("body.0.weight"))
