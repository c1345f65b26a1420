"""FSDP2 state helpers shared by models, callbacks (EMA, curricula) and the strategy (``vidgen.parallel``).

No sharding policy lives here (the strategy applies ``fully_shard`` from a model's ``fsdp_block_classes``); this is
only what code touching sharded parameters needs, written once below all of them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["reshard_all"]


def reshard_all(module: nn.Module) -> None:
    """Return FSDP2 modules to their sharded parameters (no-op without FSDP2).

    While gathered, an FSDP2 module's registered parameters are the unsharded tensors, and the root stays gathered
    after a no-grad forward (validation, ``generate``).  Code that reads or writes the shards (EMA) or toggles
    ``requires_grad`` on them (curricula) reshards first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
