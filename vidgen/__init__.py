"""vidgen: command line, tools, parallelism helper and demo of the video-generation suite."""

__version__ = "0.1.0"
