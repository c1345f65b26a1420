"""The EMA weights as buffers of the model: ``EMAShadow`` and attaching/detaching it (the EMA callback's storage).

Written below models and callbacks so that a model (e.g. a tokenizer inflating a 2D checkpoint that has EMA
weights) can keep EMA weights without importing the callback. The update schedule and the Lightning hooks are in
``vidgen.callbacks.ema``; the key rule (``EMA_PREFIX``, ``ema_state_dict``) in ``nn.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from .checkpoint import EMA_ATTR, EMA_PREFIX
from .sharding import reshard_all

__all__ = ["EMAShadow", "attach_ema", "detach_ema", "ema_shadow", "ema_weights"]


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The process-local data of ``t`` (the shard for a DTensor), aliasing its storage."""
    return t.to_local() if _is_dtensor(t) else t  # callers run under no_grad: to_local() is then an alias


class EMAShadow(nn.Module):
    """Buffers holding the EMA weights, laid out like the parameters (key ``_ema.<param name>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.param_names: list[str] = []
        self._backup: Optional[list[Tensor]] = None  # raw weights while the EMA ones are swapped in

    # -- building -------------------------------------------------------------------------------------
    def add(self, name: str, tensor: Tensor) -> None:
        *path, leaf = name.split(".")
        mod: nn.Module = self
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_buffer(leaf, tensor, persistent=True)
        self.param_names.append(name)

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, names: Optional[list[str]] = None) -> "EMAShadow":
        params = dict(module.named_parameters())
        if names is None:
            names = [n for n, p in params.items() if p.requires_grad]
        shadow = cls()
        for n in names:
            # detach().clone() of a DTensor is a DTensor with the same mesh/placements (local clone, no comm)
            shadow.add(n, params[n].detach().clone())
        return shadow

    @torch.no_grad()
    def matches(self, module: nn.Module) -> bool:
        """Whether every buffer has its parameter's kind (DTensor or not), local shape, device and dtype."""
        params = dict(module.named_parameters())
        for n in self.param_names:
            p = params.get(n)
            if p is None:
                return False
            s = self.get_buffer(n)
            if _is_dtensor(p) != _is_dtensor(s):
                return False
            pl, sl = _local(p), _local(s)
            if pl.shape != sl.shape or pl.device != sl.device:
                return False
            if _is_dtensor(p) and (p.placements != s.placements or p.device_mesh != s.device_mesh):
                return False
        return True

    # -- math -----------------------------------------------------------------------------------------
    def _pairs(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        params = dict(module.named_parameters())
        # one walk over the buffers: get_buffer per name walks the dotted path each time (for the demo tokenizer's
        # 66 tensors, 1.5 of the 2 ms an update took; the update itself is 0.2 ms)
        buffers = dict(self.named_buffers())
        shadows = [_local(buffers[n]) for n in self.param_names]
        weights = [_local(params[n]) for n in self.param_names]
        return shadows, weights

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        """``ema <- decay * ema + (1 - decay) * w`` on the local shards (``decay == 0``: copy)."""
        if self._backup is not None:
            raise RuntimeError("EMA update while the EMA weights are swapped in; swap them out first.")
        reshard_all(module)  # FSDP2 swaps unsharded tensors into the module while gathered
        shadows, weights = self._pairs(module)
        if not shadows:
            return
        weights = [w if w.dtype == s.dtype else w.to(s.dtype) for s, w in zip(shadows, weights)]
        if decay == 0.0:
            torch._foreach_copy_(shadows, weights)
        else:
            torch._foreach_lerp_(shadows, weights, 1.0 - decay)

    # -- swapping -------------------------------------------------------------------------------------
    @property
    def swapped(self) -> bool:
        return self._backup is not None

    @torch.no_grad()
    def swap_in(self, module: nn.Module) -> None:
        if self._backup is not None:
            return
        reshard_all(module)
        shadows, weights = self._pairs(module)
        self._backup = [w.clone() for w in weights]
        for w, s in zip(weights, shadows):
            w.copy_(s)

    @torch.no_grad()
    def swap_out(self, module: nn.Module) -> None:
        if self._backup is None:
            return
        reshard_all(module)
        _, weights = self._pairs(module)
        for w, b in zip(weights, self._backup):
            w.copy_(b)
        self._backup = None


def ema_shadow(pl_module: nn.Module) -> Optional[EMAShadow]:
    s = getattr(pl_module, EMA_ATTR, None)
    return s if isinstance(s, EMAShadow) else None


@contextmanager
def ema_weights(pl_module: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run the block with the EMA weights in ``pl_module``'s parameters; yields whether EMA is in use.

    A no-op (yields ``False``) when the module has no EMA or ``enabled`` is false; re-entrant (an inner use
    inside validation, where the EMA callback already swapped them in, changes nothing).
    """
    shadow = ema_shadow(pl_module)
    if not enabled or shadow is None:
        yield False
        return
    if shadow.swapped:
        yield True
        return
    shadow.swap_in(pl_module)
    try:
        yield True
    finally:
        shadow.swap_out(pl_module)


def attach_ema(pl_module: nn.Module, names: Optional[list[str]] = None) -> EMAShadow:
    """Create (or keep, if current) the EMA buffers of ``pl_module`` from its present weights."""
    shadow = ema_shadow(pl_module)
    if shadow is not None and shadow.matches(pl_module) and (names is None or set(names) == set(shadow.param_names)):
        return shadow
    if shadow is not None:
        detach_ema(pl_module)
    shadow = EMAShadow.from_module(pl_module, names)
    setattr(pl_module, EMA_ATTR, shadow)  # registers the submodule -> buffers in state_dict
    # DDP would broadcast these buffers from rank 0 at every forward (identical on all ranks anyway)
    ignore = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
    ignore |= {EMA_PREFIX + n for n in shadow.param_names}
    pl_module._ddp_params_and_buffers_to_ignore = sorted(ignore)
    return shadow


def detach_ema(pl_module: nn.Module) -> None:
    """Remove the EMA buffers (raw weights swapped back first)."""
    shadow = ema_shadow(pl_module)
    if shadow is None:
        return
    shadow.swap_out(pl_module)
    delattr(pl_module, EMA_ATTR)
    ignore = [k for k in getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []) if not k.startswith(EMA_PREFIX)]
    pl_module._ddp_params_and_buffers_to_ignore = ignore
