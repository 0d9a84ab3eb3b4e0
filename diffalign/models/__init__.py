"""Model adapters: one per family, all built on the real diffusers pipeline classes."""

from .base import Adapter, per_sample_error
from .loading import ModelLoadError, load_adapter, load_pipeline, load_trained_pipeline, resolve_family
from .tiny import build_tiny_pipeline

__all__ = [
    "Adapter",
    "per_sample_error",
    "ModelLoadError",
    "load_adapter",
    "load_pipeline",
    "load_trained_pipeline",
    "resolve_family",
    "build_tiny_pipeline",
]
