"""Samplers: signed-temperature math, truncation and engine adapters."""

from samplers.core import Truncation, apply_temperature, sample, tempered_probs, truncate

__all__ = ["Truncation", "apply_temperature", "sample", "tempered_probs", "truncate"]
