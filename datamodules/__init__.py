"""Datamodules: streaming WebDataset video/image shards with exact resume."""

from .decode import ClipSpec
from .stream import BadDataError
from .video import DataConfigError, VideoDataModule

__all__ = ["VideoDataModule", "DataConfigError", "BadDataError", "ClipSpec"]
