"""Datasets: preference pairs (Pick-a-Pic schema, JSONL, folders), the step plan, the latent cache."""

from .pairs import DataError, PairDataset, collate
from .sampler import StepPlan

__all__ = ["DataError", "PairDataset", "collate", "StepPlan"]
