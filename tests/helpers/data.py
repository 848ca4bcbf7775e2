"""Kept for ``tests/test_trust_region.py`` until it imports these from :mod:`tikmix_hf.testing`; then delete."""

from tikmix_hf.testing import RecordingCollator, toy_domains, toy_validation

__all__ = ["RecordingCollator", "toy_domains", "toy_validation"]
