"""Process memory of a benchmark phase: the RSS sampled by a thread on CPU, the allocator's peak on CUDA."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
from collections.abc import Callable

import torch

#: A function returning this process's resident set size in bytes.
RssReader = Callable[[], int]


def trim_heap() -> None:
    """Return freed memory to the OS (glibc), so that the RSS at the start of a phase is what is really in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_reader() -> RssReader | None:
    """A function returning this process's resident set size in bytes, or None where none is available."""
    try:
        import psutil

        process = psutil.Process()
        return lambda: int(process.memory_info().rss)
    except ImportError:
        pass
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read
    return None


class PhaseMemory:
    """Process memory of one phase (a ``with`` block).

    On CPU: the resident set size is sampled every ``interval`` seconds by a background thread (torch kernels release
    the GIL, so sampling goes on during them); ``start`` is the RSS when the phase began (after ``gc`` and
    ``malloc_trim``), ``peak`` the highest sample. Short spikes between samples can be missed, and memory the
    allocator kept from earlier phases is reused without raising the RSS, so ``peak - start`` is a lower bound of
    what the phase allocated. On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
    (``start`` = memory allocated when the phase began), exact for tensors torch allocates.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self.start: int | None = None
        self.peak: int | None = None
        self.why_none: str | None = None
        self._read = None if device.type == "cuda" else rss_reader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta(self) -> int | None:
        """Growth of the phase over its start (None when nothing was measured)."""
        return None if self.start is None or self.peak is None else self.peak - self.start

    def __enter__(self) -> PhaseMemory:
        trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        if self._read is None:
            self.why_none = "no RSS reader on this platform (install psutil)"
            return self
        self.start = self.peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._read is not None and self.peak is not None
        while not self._stop.wait(self.interval):
            value = self._read()
            if value > self.peak:
                self.peak = value

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        if self._thread is not None and self._read is not None and self.peak is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._read())


def memory_fields(prefix: str, probes: list[PhaseMemory]) -> dict[str, int | None]:
    """``<prefix>_rss_*`` / ``<prefix>_cuda_*`` row fields from phase probes (the largest growth if several)."""
    measured = [p for p in probes if p.delta is not None]
    kind = "cuda" if probes and probes[0].kind == "cuda_allocated" else "rss"
    other = "rss" if kind == "cuda" else "cuda"
    fields: dict[str, int | None] = {f"{prefix}_{kind}_peak_bytes": None, f"{prefix}_{kind}_delta_bytes": None,
                                     f"{prefix}_{other}_peak_bytes": None, f"{prefix}_{other}_delta_bytes": None}
    if measured:
        worst = max(measured, key=lambda p: p.delta or 0)
        fields[f"{prefix}_{kind}_peak_bytes"] = worst.peak
        fields[f"{prefix}_{kind}_delta_bytes"] = worst.delta
    return fields
