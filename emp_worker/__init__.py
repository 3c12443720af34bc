"""emp worker runtime and plugin SDK."""

__version__ = "0.1.0"
