"""Test helpers: tiny models (models.py), token data (data.py), the torchrun launcher (launch.py)."""
