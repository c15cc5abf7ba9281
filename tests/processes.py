"""Stopping the processes a test started: SIGTERM to all (they drain in parallel), then wait."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable


def stop_all(processes: Iterable[subprocess.Popen], timeout_s: float = 60.0) -> None:
    """SIGTERM every process still running, then wait for each; one that does not exit is killed."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
