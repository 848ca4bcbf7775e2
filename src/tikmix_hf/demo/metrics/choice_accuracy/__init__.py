"""Folder of the ``choice_accuracy`` evaluate module; see ``choice_accuracy.py``."""
