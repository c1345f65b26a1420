"""Moved to :mod:`vidgen.datamodules.media` (the one video/image I/O module, below models, callbacks and tools);
this name stays importable for existing scripts."""

from vidgen.datamodules.media import *  # noqa: F401,F403
from vidgen.datamodules.media import MediaError, FrameReader  # noqa: F401
