"""Seconds spent in timed sections of code that launch device work (the training window's hooks).

On a CUDA device a section's kernels run after the Python code that launched them returns, so a
wall clock around the code measures only the launches. There each section is bracketed by CUDA
events on the current stream and the elapsed times are read when the total is asked for, without
synchronising inside the section; elsewhere the wall clock is exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["DeviceTimer"]


class DeviceTimer:
    """Sums the time of :meth:`section` blocks on ``device``; :attr:`seconds` is the total so far."""

    def __init__(self, device: torch.device | str, seconds: float = 0.0):
        self.cuda = torch.device(device).type == "cuda"
        self._seconds = float(seconds)
        self._events: list = []

    @contextmanager
    def section(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - t0

    @property
    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self._seconds
