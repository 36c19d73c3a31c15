"""Samplers: signed-temperature math, truncation and engine adapters."""

from samplers.core import apply_temperature, sample, tempered_probs, truncate

__all__ = ["apply_temperature", "sample", "tempered_probs", "truncate"]
