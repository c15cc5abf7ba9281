"""Peak memory of one cell: resident memory of the process on the CPU, allocated memory on a GPU.

Why reset: a cell's process first loads the model and warms it up; the peak that matters is
the one reached while the measured operations run, on top of the weights that stay resident.
Linux resets the resident high-water mark (VmHWM) to the current resident size when "5" is
written to /proc/self/clear_refs; where that is impossible the peak counts from process start.
"""

from __future__ import annotations

import re
from pathlib import Path


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def resident_bytes(pid: int | str = "self") -> int | None:
    """A process's resident memory now (Linux), else None."""
    kib = _status_kib("VmRSS", pid)
    return None if kib is None else kib << 10


def peak_resident_bytes(pid: int | str) -> int | None:
    """A process's resident high-water mark (Linux), else None."""
    kib = _status_kib("VmHWM", pid)
    return None if kib is None else kib << 10


def reset_peak(pid: int | str = "self") -> None:
    """Set a process's high-water mark to its resident size now (Linux; OSError elsewhere)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_resident_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: the whole life of the process (ru_maxrss is KiB on Linux, bytes on macOS)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak << 10
    return kib << 10


class PeakMemory:
    """Reset, run the measured operations, then read the peaks reached since the reset."""

    def __init__(self, device: str | None) -> None:
        self.cuda = device is not None and device.startswith("cuda")
        self.since = "process start"

    def reset(self) -> None:
        try:
            reset_peak()
            self.since = "reset after warm-up"
        except OSError:
            self.since = "process start"
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, int | str]:
        """peak_memory_bytes is what the report compares: GPU allocated on a GPU, else CPU resident."""
        peaks: dict[str, int | str] = {"peak_rss_bytes": _peak_resident_bytes(), "peak_rss_since": self.since}
        if self.cuda:
            import torch

            peaks["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        peaks["peak_memory_bytes"] = peaks["peak_gpu_bytes"] if self.cuda else peaks["peak_rss_bytes"]
        return peaks
