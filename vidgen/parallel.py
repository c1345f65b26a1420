"""FSDP2 sharding and activation checkpointing, applied to a model from the outside by the strategy.

How a model opts in (the model file imports nothing for it, neither this module nor ``torch.distributed``)::

    class Latte(L.LightningModule):
        fsdp_block_classes = (LatteBlock,)        # the repeated transformer blocks

That is all. Under DDP / a single device the attribute is unused. Under :class:`FSDP2Strategy` the strategy's
``setup`` (after Lightning's ``configure_model`` hook, so lazily built layers exist) calls
:func:`configure_model_parallel`, which

1. shards every (outermost) instance of ``fsdp_block_classes`` with ``fully_shard`` (one all-gather per block),
   optionally wrapping its forward in non-reentrant activation checkpointing first;
2. shards the LightningModule itself as the FSDP root, which picks up every parameter outside the blocks
   (embeddings, final layers, stray ``nn.Parameter``s): nothing is left unsynchronised;
3. registers ``training_step`` / ``validation_step`` / ``test_step`` / ``predict_step`` / ``generate``
   (plus any name in the optional class attribute ``fsdp_forward_methods``) as FSDP forward methods, so the
   root parameters are all-gathered around those calls. Lightning calls ``training_step``, not ``forward``;
   without this the root parameters would never be unsharded. A method that touches root parameters and is
   called from elsewhere (e.g. ``decode`` from a callback) must be listed in ``fsdp_forward_methods``.

Sharding is idempotent (the strategy's ``setup`` runs once per ``fit``/``validate``/``test``/``predict``).
Lightning's plain ``ModelParallelStrategy`` expects the model to shard itself in ``configure_model``; vidgen models
do not, so use :class:`FSDP2Strategy` (``configs/trainer/fsdp*.yaml``).

Options come from the strategy, so the trainer recipe (``configs/trainer/fsdp*.yaml``) is the only place
that mentions them::

    strategy:
      class_path: vidgen.parallel.FSDP2Strategy
      init_args: {mixed_precision: bf16, activation_checkpointing: true}

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (sharded DCP checkpoints, works on CPU/gloo) with
FSDP defaults: the data-parallel mesh spans all processes (``ModelParallelStrategy``'s own default makes every GPU of
a node a *tensor*-parallel rank, which with FSDP alone would feed identical batches to all of them) and the FSDP2
options above.

Mixed precision: ``mixed_precision: bf16`` gives FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``: fp32 sharded master weights and optimizer state, bf16 all-gathers and compute, fp32
gradient reduce-scatter. The recipe pairs it with ``precision: bf16-mixed`` (autocast): the policy alone
casts parameters, not the fp32 tensors a model creates inside its step (timestep embeddings, noise), which
would then meet bf16 weights; autocast also keeps norms/softmax/losses in fp32. The root keeps its inputs
as given (``cast_forward_inputs=False``), so targets such as ``batch["video"]`` stay fp32.

Sharded checkpoints are DCP directories; ``vidgen consolidate`` turns one into a single ``.ckpt``
(:mod:`vidgen.checkpoint_tools`).
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = [
    "FSDP2Strategy",
    "apply_fsdp2",
    "configure_model_parallel",
    "mixed_precision_policy",
]

#: methods registered as FSDP forward methods on the root (when the module has them)
DEFAULT_FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step", "generate")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def mixed_precision_policy(
    mixed_precision: Optional[str], output_dtype: Optional[torch.dtype] = None, cast_forward_inputs: bool = True
) -> Optional["MixedPrecisionPolicy"]:
    """``"bf16"``/``"fp16"`` -> ``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=fp32)``; ``None`` -> ``None``."""
    if mixed_precision is None or str(mixed_precision).lower() in ("none", "fp32", "32", "float32"):
        return None
    key = str(mixed_precision).lower()
    if key not in _DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r} is not supported; use 'bf16', 'fp16' or None.")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=_DTYPES[key],
        reduce_dtype=torch.float32,
        output_dtype=output_dtype,
        cast_forward_inputs=cast_forward_inputs,
    )


# ---------------------------------------------------------------------------------------------------------
# activation checkpointing (class swap: names, state_dict keys and deepcopy are unaffected)
# ---------------------------------------------------------------------------------------------------------
_AC_CLASSES: dict[type, type] = {}


def _activation_checkpointed_class(cls: type) -> type:
    if getattr(cls, "_vidgen_activation_checkpointed", False):
        return cls
    if cls not in _AC_CLASSES:
        from torch.utils.checkpoint import checkpoint

        def forward(self, *args, **kwargs):
            inner = cls.forward.__get__(self)
            if torch.is_grad_enabled():
                # non-reentrant: works with kwargs, FSDP2 hooks (outside this call) and preserves RNG (dropout)
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        _AC_CLASSES[cls] = type(
            f"ActivationCheckpointed{cls.__name__}",
            (cls,),
            {"forward": forward, "_vidgen_activation_checkpointed": True, "__module__": cls.__module__},
        )
    return _AC_CLASSES[cls]


def _apply_activation_checkpointing(module: nn.Module) -> None:
    module.__class__ = _activation_checkpointed_class(type(module))


def _outermost_instances(module: nn.Module, block_classes: tuple[type, ...]) -> list[nn.Module]:
    """Instances of ``block_classes`` under ``module`` that have no ancestor block, in module order."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, block_classes):
                found.append(child)
            else:
                visit(child)

    visit(module)
    return found


def apply_fsdp2(
    module: nn.Module,
    block_classes: tuple[type, ...],
    mesh: "DeviceMesh",
    mp_policy: Optional["MixedPrecisionPolicy"] = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    forward_methods: tuple[str, ...] = (),
) -> nn.Module:
    """Shard each outermost ``block_classes`` instance, then ``module`` itself as the root (in place).

    ``activation_checkpointing`` recomputes each block's forward in backward. ``forward_methods`` are methods of
    ``module`` (besides ``forward``) that run with the root's parameters all-gathered. The root is not resharded
    after forward (its parameters are needed again at the start of backward); the last block neither.
    Returns ``module``.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    block_classes = tuple(block_classes)
    if not block_classes:
        raise ValueError(
            f"apply_fsdp2: no block classes given for {type(module).__name__}. Name the repeated blocks, e.g. "
            "`fsdp_block_classes = (TransformerBlock,)` on the LightningModule."
        )
    if isinstance(module, FSDPModule):
        raise ValueError(f"apply_fsdp2: {type(module).__name__} is already sharded with fully_shard.")
    blocks = _outermost_instances(module, block_classes)
    if not blocks:
        names = ", ".join(c.__name__ for c in block_classes)
        raise ValueError(
            f"apply_fsdp2: {type(module).__name__} contains no instance of {names}. "
            "Set `fsdp_block_classes` to the classes of its repeated blocks."
        )
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for i, block in enumerate(blocks):
        if activation_checkpointing:
            _apply_activation_checkpointing(block)
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and not last)
    root_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype,
        output_dtype=torch.float32 if policy.param_dtype is not None else policy.output_dtype,
        cast_forward_inputs=False,
    )
    fully_shard(module, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)
    for name in forward_methods:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return module


# ---------------------------------------------------------------------------------------------------------
# Lightning glue
# ---------------------------------------------------------------------------------------------------------
def _fsdp_mesh(device_mesh: "DeviceMesh") -> "DeviceMesh":
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"vidgen applies FSDP2 only, but the device mesh has tensor_parallel={device_mesh['tensor_parallel'].size()}"
            " (ModelParallelStrategy's default). Use `vidgen.parallel.FSDP2Strategy` (configs/trainer/fsdp.yaml) or"
            " ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)."
        )
    if "data_parallel" in names:
        return device_mesh["data_parallel"]
    if device_mesh.ndim != 1:
        raise ValueError(f"Cannot pick the data-parallel dimension of device mesh {device_mesh}.")
    return device_mesh


def configure_model_parallel(pl_module: nn.Module, mesh: Optional["DeviceMesh"] = None) -> None:
    """Shard ``pl_module`` with FSDP2 over ``mesh`` (default: the mesh its strategy gave it); no mesh: do nothing.

    Reads ``type(pl_module).fsdp_block_classes``, optional ``fsdp_forward_methods``, and the options of the
    trainer's :class:`FSDP2Strategy` (``mixed_precision``, ``activation_checkpointing``, ``reshard_after_forward``).
    """
    mesh = mesh if mesh is not None else getattr(pl_module, "_device_mesh", None)
    if mesh is None:
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(pl_module, FSDPModule):  # already configured (configure_model runs for every trainer call)
        return
    block_classes = tuple(getattr(type(pl_module), "fsdp_block_classes", ()) or ())
    if not block_classes:
        raise ValueError(
            f"{type(pl_module).__name__} runs under a model-parallel strategy but names no `fsdp_block_classes`."
            " Add e.g. `fsdp_block_classes = (MyBlock,)` as a class attribute."
        )
    strategy = None
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is not None:
        strategy = trainer.strategy
    opts = strategy.fsdp_options if isinstance(strategy, FSDP2Strategy) else {}
    extra = tuple(getattr(type(pl_module), "fsdp_forward_methods", ()) or ())
    forward_methods = tuple(dict.fromkeys(DEFAULT_FORWARD_METHODS + extra))  # each registered once
    apply_fsdp2(
        pl_module,
        block_classes,
        _fsdp_mesh(mesh),
        mp_policy=mixed_precision_policy(opts.get("mixed_precision")),
        reshard_after_forward=opts.get("reshard_after_forward", True),
        activation_checkpointing=opts.get("activation_checkpointing", False),
        forward_methods=forward_methods,
    )


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning ``ModelParallelStrategy`` for FSDP2 (data-parallel mesh over all processes) plus its options.

    Args:
        mixed_precision: ``"bf16"``/``"fp16"``: FSDP2 ``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=fp32)``;
            ``None``: fp32.
        activation_checkpointing: recompute each block's activations in backward.
        reshard_after_forward: free the gathered block parameters after forward (ZeRO-3); ``False`` keeps
            them until backward (ZeRO-2-like: more memory, one all-gather less per block).
        data_parallel_size: ``"auto"``: all processes (``num_nodes * devices``).
        tensor_parallel_size: must stay 1 (vidgen applies no tensor parallelism).
        save_distributed_checkpoint: ``True``: a DCP directory with one shard per rank; ``False``: a single file
            gathered on rank 0.
    """

    def __init__(
        self,
        mixed_precision: Optional[Literal["bf16", "fp16"]] = None,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
    ) -> None:
        mixed_precision_policy(mixed_precision)  # validate early
        if tensor_parallel_size != 1:
            raise ValueError("FSDP2Strategy: tensor_parallel_size must be 1 (vidgen applies FSDP2 only).")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout if timeout is not None else default_pg_timeout,
        )
        self.fsdp_options: dict[str, Any] = {
            "mixed_precision": mixed_precision,
            "activation_checkpointing": bool(activation_checkpointing),
            "reshard_after_forward": bool(reshard_after_forward),
        }

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        """Shard the model from its ``fsdp_block_classes`` (after ``configure_model``), then Lightning's setup.

        ``ModelParallelStrategy.setup`` insists that the LightningModule overrides ``configure_model`` to shard itself;
        here the strategy does the sharding, so that check is satisfied by what the strategy has just done."""
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        configure_model_parallel(self.lightning_module, self.device_mesh)
        if any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            raise TypeError("FSDP2Strategy found modules wrapped in FSDP1 `FullyShardedDataParallel`; it applies FSDP2.")
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Sharded save into ``<path>.tmp``, then renamed over ``<path>`` by rank 0 (like ``AtomicCheckpointIO``).

        Overwriting a DCP directory in place (``last.ckpt`` every N steps) would leave a mix of old and new shards
        if the job were killed mid-save. Here the old directory stays intact until the new one is complete; only
        between two renames is ``<path>`` briefly absent (``<path>.old`` then still holds the previous one).
        """
        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        if "://" in str(filepath):  # remote stores: no rename dance
            return super().save_checkpoint(checkpoint, path)
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp)
        self.barrier()
        if self.global_rank == 0:
            _remove(old)
            if path.exists() or path.is_symlink():
                path.rename(old)
            tmp.rename(path)
            _remove(old)
        self.barrier()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
