"""Test-only helpers: the torchrun launcher (launch.py) and brute-force references (reference.py).

Models and data come from :mod:`tikmix_hf.testing`.
"""
