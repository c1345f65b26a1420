"""Datamodules: streaming WebDataset video/image shards with exact resume.

Every name loads on first use (PEP 562): ``lightning`` costs ~10 CPU-seconds to import (it imports torchmetrics,
which imports torchvision and transformers) and torch 2-6 more, and the shard tools (``vidgen.shards``, the demo's
data build) need neither: only the file list, tar and media helpers of this package.
"""

__all__ = ["VideoDataModule", "DataConfigError", "BadDataError", "ClipSpec"]

_LAZY = {"VideoDataModule": ".video", "DataConfigError": ".video", "ClipSpec": ".decode", "BadDataError": ".stream"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
