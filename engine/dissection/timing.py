"""Seconds per phase of a dissection (true on CUDA: queued work is waited for)."""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    """Wait for queued device work so that phase timings are true on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Accumulates seconds per phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        _sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


