"""FSDP2 helper, sharded checkpoints and EMA under DDP / FSDP2 (2 gloo processes on CPU).

The distributed part runs once per module (fixture ``dist_run``): this file is also the worker script,
started as ``python tests/test_fsdp.py OUT``; Lightning's own subprocess launcher starts the second rank.
In the same two processes it runs, with a deterministic per-rank data stream (no DistributedSampler):

  ddp_full      DDP, N steps, checkpoint at step K          ddp_resume   DDP from ddp_full's step-K checkpoint
  fsdp_full     FSDP2 (ModelParallelStrategy), same          fsdp_resume  FSDP2 from the sharded step-K directory
  fsdp_noema    FSDP2, K steps without EMA                   fsdp_add_ema FSDP2 + EMA resumed from fsdp_noema
  consolidate   rank 0: fsdp_full step-K dir -> one file     ddp_from_consolidated  DDP resumed from that file

and records per-rank losses and rank-0 full (gathered) states; the tests compare them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402

from vidgen.callbacks.ema import EMA, EMA_PREFIX, ema_decay, ema_state_dict, raw_state_dict  # noqa: E402
from vidgen.parallel import FSDP2Strategy, apply_fsdp2  # noqa: E402

K, N, BATCH, IN, HID, OUT = 4, 8, 2, 5, 6, 3
DECAY, WARMUP = 0.8, 3


# ---------------------------------------------------------------------------------------------------------
# tiny model + data (shared by the worker and the in-process tests)
# ---------------------------------------------------------------------------------------------------------
class TinyBlock(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))))


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HID)
        self.blocks = nn.ModuleList([TinyBlock(HID, dropout) for _ in range(2)])
        self.out = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class TinyModule(L.LightningModule):
    fsdp_block_classes = (TinyBlock,)

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()
        self.gain = nn.Parameter(torch.full((OUT,), 1.5), requires_grad=False)  # frozen: no EMA
        self.register_buffer("offset", torch.full((OUT,), 0.25))
        self.val_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x) * self.gain + self.offset, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x) * self.gain + self.offset, y)
        self.val_losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1)


class PerRankData(torch.utils.data.Dataset):
    """K batches per epoch; item i of rank r is a fixed function of (r, i)."""

    def __init__(self, rank: int, n: int = K * BATCH) -> None:
        self.rank, self.n = rank, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(1000 * self.rank + i)
        return torch.randn(IN, generator=g), torch.randn(OUT, generator=g)


# ---------------------------------------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------------------------------------
def _full_state(pl_module) -> dict:
    """Full (gathered) state dict on every rank (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}


class Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.losses: dict[int, float] = {}
        self.raw_trajectory: list[dict] = []  # full raw params at every step (rank 0), for the EMA replay

    def on_train_start(self, trainer, pl_module):
        sd = _full_state(pl_module)
        self.start_step = trainer.global_step
        self.raw_trajectory.append({k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        g = trainer.global_step
        self.losses[g] = float(outputs["loss"])
        sd = _full_state(pl_module)
        self.raw_trajectory.append({k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)})
        if g in (K, N) and trainer.is_global_zero:
            torch.save(sd, self.out / f"state_{g}.pt")

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        record = {"losses": self.losses, "val_losses": pl_module.val_losses}
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))
        if trainer.is_global_zero:
            torch.save({"start": self.start_step, "states": self.raw_trajectory}, self.out / "trajectory.pt")


def _run(name: str, strategy: str, root: Path, ckpt_path=None, seed: int = 0, ema: bool = True, max_steps: int = N) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    model = TinyModule()
    rank = int(os.environ.get("LOCAL_RANK", 0))
    train = torch.utils.data.DataLoader(PerRankData(rank), batch_size=BATCH, shuffle=False)
    val = torch.utils.data.DataLoader(PerRankData(rank + 10, n=BATCH), batch_size=BATCH)
    strategies = {
        "ddp": lambda: "ddp",
        "fsdp": FSDP2Strategy,
        "fsdp_bf16": lambda: FSDP2Strategy(mixed_precision="bf16", activation_checkpointing=True),
    }
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategies[strategy](),
        precision="bf16-mixed" if strategy == "fsdp_bf16" else "32-true",
        max_steps=max_steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[
            *([EMA(decay=DECAY, warmup_steps=WARMUP)] if ema else []),
            Recorder(out),
            ModelCheckpoint(dirpath=out / "ckpts", filename="{step}", every_n_train_steps=K, save_top_k=-1, save_last=True),
        ],
    )
    t0 = time.time()
    trainer.fit(model, train, val, ckpt_path=str(ckpt_path) if ckpt_path else None)
    if trainer.is_global_zero:
        print(f"[worker] {name}: {time.time() - t0:.1f}s (ends at {time.time() % 1000:.1f})", flush=True)


def worker(root: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    _run("ddp_full", "ddp", root)
    _run("ddp_resume", "ddp", root, root / "ddp_full/ckpts/step=4.ckpt", seed=1)
    _run("fsdp_full", "fsdp", root)
    _run("fsdp_resume", "fsdp", root, root / "fsdp_full/ckpts/step=4.ckpt", seed=1)
    _run("fsdp_noema", "fsdp", root, ema=False, max_steps=K)  # a sharded checkpoint without EMA entries
    _run("fsdp_add_ema", "fsdp", root, root / "fsdp_noema/ckpts/step=4.ckpt", seed=1)
    _run("fsdp_bf16", "fsdp_bf16", root, max_steps=K)  # the fsdp_bf16.yaml recipe: bf16 policy + AC + autocast
    if dist.get_rank() == 0:
        from vidgen.checkpoint_tools import consolidate_main

        consolidate_main([str(root / "fsdp_full/ckpts/step=4.ckpt"), str(root / "fsdp_consolidated.ckpt")])
    dist.barrier()
    _run("ddp_from_consolidated", "ddp", root, root / "fsdp_consolidated.ckpt", seed=1)
    _run("fsdp_from_consolidated", "fsdp", root, root / "fsdp_consolidated.ckpt", seed=1)


# ---------------------------------------------------------------------------------------------------------
# tests on the distributed run
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, str(root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=500
    )
    (root / "worker.log").write_text(proc.stdout + proc.stderr)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    print(f"distributed worker: {time.time() - t0:.1f}s\n" + "\n".join(l for l in proc.stdout.splitlines() if "[worker]" in l))
    return root


def _json(path: Path) -> dict:
    d = json.loads(path.read_text())
    d["losses"] = {int(k): v for k, v in d["losses"].items()}
    return d


def _assert_states_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {set(a) ^ set(b)}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{what}: {k}: {m}")


def _check_resume(root: Path, full: str, resumed: str, atol: float) -> None:
    for rank in (0, 1):
        a, b = _json(root / full / f"rank{rank}.json"), _json(root / resumed / f"rank{rank}.json")
        assert sorted(b["losses"]) == list(range(K + 1, N + 1)), b["losses"]
        for step in range(K + 1, N + 1):
            assert abs(a["losses"][step] - b["losses"][step]) <= atol, (rank, step, a["losses"][step], b["losses"][step])
        # the resumed run validates at the end of epoch 1 with the EMA weights: same as the full run's last
        assert abs(a["val_losses"][-1] - b["val_losses"][-1]) <= atol
    sa, sb = torch.load(root / full / f"state_{N}.pt"), torch.load(root / resumed / f"state_{N}.pt")
    assert any(k.startswith(EMA_PREFIX) for k in sb)
    _assert_states_close(sa, sb, atol, f"{full} vs {resumed}")


def _check_ema_replay(root: Path, run: str, atol: float) -> None:
    """The EMA at step N equals the decay schedule applied to the recorded raw trajectory from its start."""
    rec = torch.load(root / run / "trajectory.pt")
    start, traj = rec["start"], rec["states"]
    assert len(traj) == N - start + 1
    state = torch.load(root / run / f"state_{N}.pt")
    ema_keys = sorted(k[len(EMA_PREFIX) :] for k in state if k.startswith(EMA_PREFIX))
    assert ema_keys == sorted(n for n in traj[0] if n.startswith("net.")), ema_keys  # trainable only
    for name in ema_keys:
        e = traj[0][name].double()
        for g in range(start + 1, N + 1):
            d = ema_decay(g, DECAY, WARMUP)
            e = d * e + (1 - d) * traj[g - start][name].double()
        torch.testing.assert_close(state[EMA_PREFIX + name].double(), e, atol=atol, rtol=0)
        assert not torch.allclose(state[EMA_PREFIX + name], state[name])  # the EMA really lags


@pytest.mark.distributed
def test_ema_resume_ddp(dist_run):
    _check_resume(dist_run, "ddp_full", "ddp_resume", atol=1e-6)
    _check_ema_replay(dist_run, "ddp_full", atol=1e-6)


@pytest.mark.distributed
def test_ema_resume_fsdp2(dist_run):
    _check_resume(dist_run, "fsdp_full", "fsdp_resume", atol=1e-6)
    _check_ema_replay(dist_run, "fsdp_full", atol=1e-6)
    # the checkpoint is a DCP directory holding the EMA entries sharded with the model
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = dist_run / "fsdp_full/ckpts/step=4.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    # FSDP2Strategy writes <path>.tmp then renames: last.ckpt was overwritten in place at step 8, nothing left over
    names = sorted(p.name for p in (dist_run / "fsdp_full/ckpts").iterdir())
    assert names == ["last.ckpt", "step=4.ckpt", "step=8.ckpt"], names
    assert torch.load(dist_run / "fsdp_full/ckpts/last.ckpt/meta.pt", weights_only=False)["global_step"] == N
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert "state_dict._ema.net.blocks.0.fc1.weight" in keys and "state_dict.net.blocks.0.fc1.weight" in keys


def _loss(state: dict, batch) -> float:
    model = TinyModule()
    model.load_state_dict(state)
    with torch.no_grad():
        return float(model.validation_step(batch, 0))


def _check_eval_swap(root: Path, run: str) -> None:
    """Validation after step K ran with the EMA weights; the next training step with the raw ones again."""
    state = torch.load(root / run / f"state_{K}.pt")
    for rank in (0, 1):
        rec = _json(root / run / f"rank{rank}.json")
        val_batch = next(iter(torch.utils.data.DataLoader(PerRankData(rank + 10, n=BATCH), batch_size=BATCH)))
        train_batch = next(iter(torch.utils.data.DataLoader(PerRankData(rank), batch_size=BATCH)))
        assert abs(rec["val_losses"][0] - _loss(ema_state_dict(state), val_batch)) < 1e-6
        assert abs(rec["val_losses"][0] - _loss(raw_state_dict(state), val_batch)) > 1e-4
        # the loss of step K+1 is computed before its update: with the raw step-K weights
        assert abs(rec["losses"][K + 1] - _loss(raw_state_dict(state), train_batch)) < 1e-6


@pytest.mark.distributed
def test_ema_eval_swap(dist_run):
    _check_eval_swap(dist_run, "ddp_full")
    _check_eval_swap(dist_run, "fsdp_full")


@pytest.mark.distributed
def test_ema_resume_from_sharded_checkpoint_without_ema(dist_run):
    """Resuming FSDP2 from a sharded checkpoint that has no EMA entries: EMA starts from the restored weights."""
    a, b = _json(dist_run / "fsdp_full/rank0.json"), _json(dist_run / "fsdp_add_ema/rank0.json")
    for step in range(K + 1, N + 1):  # the raw training is unaffected
        assert abs(a["losses"][step] - b["losses"][step]) <= 1e-6
    _check_ema_replay(dist_run, "fsdp_add_ema", atol=1e-6)
    assert "has no EMA weights; the EMA starts from the restored weights" in (dist_run / "worker.log").read_text()


@pytest.mark.distributed
def test_fsdp2_bf16_recipe_runs(dist_run):
    """bf16 policy + activation checkpointing + autocast: trains, keeps fp32 master weights and fp32 EMA."""
    a, b = _json(dist_run / "fsdp_full/rank0.json"), _json(dist_run / "fsdp_bf16/rank0.json")
    for step in range(1, K + 1):
        assert abs(a["losses"][step] - b["losses"][step]) < 0.05 * abs(a["losses"][step]) + 1e-2, (step, a, b)
    state = torch.load(dist_run / f"fsdp_bf16/state_{K}.pt")
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any(k.startswith(EMA_PREFIX) for k in state)


@pytest.mark.distributed
def test_fsdp2_matches_ddp(dist_run):
    """Same data, same init: the sharded run follows the DDP run up to reduction-order rounding."""
    _assert_states_close(
        torch.load(dist_run / f"ddp_full/state_{N}.pt"), torch.load(dist_run / f"fsdp_full/state_{N}.pt"), 1e-5, "ddp vs fsdp"
    )


@pytest.mark.distributed
def test_consolidate_equals_unsharded(dist_run):
    ckpt = torch.load(dist_run / "fsdp_consolidated.ckpt", weights_only=False)
    _assert_states_close(ckpt["state_dict"], torch.load(dist_run / f"fsdp_full/state_{K}.pt"), 0.0, "consolidated")
    assert ckpt["global_step"] == K and len(ckpt["optimizer_states"]) == 1
    opt = ckpt["optimizer_states"][0]
    trainable = [k for k in ckpt["state_dict"] if k.startswith("net.")]
    assert opt["param_groups"][0]["params"] == trainable and sorted(opt["state"]) == sorted(trainable)
    # DDP and FSDP2 runs resumed from the consolidated FSDP2 checkpoint continue the FSDP2 trajectory
    _check_resume(dist_run, "fsdp_full", "ddp_from_consolidated", atol=1e-5)
    _check_resume(dist_run, "fsdp_full", "fsdp_from_consolidated", atol=1e-6)


@pytest.mark.distributed
def test_export_ema(dist_run, tmp_path):
    from safetensors.torch import load_file

    from vidgen.checkpoint_tools import export_main

    ref = ema_state_dict(torch.load(dist_run / f"fsdp_full/state_{K}.pt"))
    assert set(ref) == {k for k in torch.load(dist_run / f"fsdp_full/state_{K}.pt") if not k.startswith(EMA_PREFIX)}
    sharded = dist_run / "fsdp_full/ckpts/step=4.ckpt"
    assert export_main(["--ema", str(sharded), str(tmp_path / "ema.safetensors")]) == 0
    assert export_main(["--ema", str(dist_run / "fsdp_consolidated.ckpt"), str(tmp_path / "ema.pt")]) == 0
    for got in (load_file(str(tmp_path / "ema.safetensors")), torch.load(tmp_path / "ema.pt")):
        _assert_states_close(got, ref, 0.0, "export --ema")
    assert export_main([str(sharded), str(tmp_path / "raw.safetensors")]) == 0
    raw = load_file(str(tmp_path / "raw.safetensors"))
    assert not torch.equal(raw["net.inp.weight"], ref["net.inp.weight"])


# ---------------------------------------------------------------------------------------------------------
# in-process tests of apply_fsdp2 (world size 1)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def mesh1(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet(dropout=0.3)
        self.head = nn.Sequential(TinyBlock(HID), nn.Linear(HID, 1))  # a block outside net
        self.free = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.head(self.net.inp(x) + self.free).sum() + self.net(x).sum()


def test_apply_fsdp2_wraps_only_named_blocks(mesh1):
    from torch.distributed.fsdp import FSDPModule

    class Outer(nn.Module):  # a block class that contains another block: only the outer one is sharded
        def __init__(self):
            super().__init__()
            self.inner = TinyBlock(HID)

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model = Wrapper()
    model.net.blocks.append(Outer())
    names_before = [n for n, _ in model.named_parameters()]
    apply_fsdp2(model, (TinyBlock, Outer), mesh1, activation_checkpointing=True)
    sharded = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    assert sharded == {"", "net.blocks.0", "net.blocks.1", "net.blocks.2", "head.0"}
    checkpointed = {n for n, m in model.named_modules() if getattr(m, "_vidgen_activation_checkpointed", False)}
    assert checkpointed == sharded - {""}
    assert isinstance(model.net.blocks[0], TinyBlock)
    assert [n for n, _ in model.named_parameters()] == names_before  # names (checkpoint keys) unchanged
    with pytest.raises(ValueError, match="no instance of"):
        apply_fsdp2(nn.Sequential(nn.Linear(2, 2)), (TinyBlock,), mesh1)


def test_activation_checkpointing_keeps_outputs_and_grads(mesh1):
    import copy

    torch.manual_seed(0)
    ref = Wrapper()
    ac = copy.deepcopy(ref)
    apply_fsdp2(ac, (TinyBlock,), mesh1, activation_checkpointing=True)
    x = torch.randn(4, IN)
    outs, grads = [], []
    for model in (ref, ac):
        torch.manual_seed(123)  # same dropout masks (checkpoint replays the RNG state)
        y = model(x)
        y.backward()
        outs.append(y.detach())
        grads.append({n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_fsdp2_strategy_options():
    s = FSDP2Strategy(mixed_precision="bf16", activation_checkpointing=True)
    assert s.fsdp_options == {"mixed_precision": "bf16", "activation_checkpointing": True, "reshard_after_forward": True}
    with pytest.raises(ValueError):
        FSDP2Strategy(mixed_precision="int8")
    with pytest.raises(ValueError):
        FSDP2Strategy(tensor_parallel_size=2)


@pytest.mark.parametrize("name", ["cpu", "ddp", "fsdp", "fsdp_bf16", "slurm"])
def test_trainer_recipes(name, monkeypatch):
    """Each recipe is a trainer section that instantiates (device flags overridden for this CPU box)."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    cfg = yaml.safe_load((REPO / "configs/trainer" / f"{name}.yaml").read_text())
    assert set(cfg) == {"trainer"}
    if name == "slurm":
        for k, v in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "n1",
                     "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "1"}.items():
            monkeypatch.setenv(k, v)
    args = ["--config", str(REPO / "configs/trainer" / f"{name}.yaml"), "--trainer.accelerator=cpu", "--trainer.logger=false"]
    if name != "cpu":
        args.append("--trainer.devices=2")
    monkeypatch.setattr(sys, "argv", ["vidgen"])
    cli = LightningCLI(TinyModule, run=False, args=args, save_config_callback=None)
    trainer = cli.trainer
    if name in ("fsdp", "fsdp_bf16"):
        assert isinstance(trainer.strategy, FSDP2Strategy)
        assert trainer.strategy.fsdp_options["mixed_precision"] == ("bf16" if name == "fsdp_bf16" else None)
    if name == "slurm":
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        env = trainer.strategy.cluster_environment
        assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal.name == "SIGUSR1"


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
