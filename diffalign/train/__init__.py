"""The training loop, the reference model and checkpoints."""

from .loop import train

__all__ = ["train"]
