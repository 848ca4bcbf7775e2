"""Kept for ``tests/test_trust_region.py`` until it imports :func:`tikmix_hf.testing.toy_model`; then delete."""

from tikmix_hf.testing import toy_model

__all__ = ["toy_model"]
