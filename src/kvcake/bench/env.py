"""The environment of a benchmark run: hardware and library versions, and the scaled-dot-product kernel in use."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_backend(name: str | None):
    """A context restricting torch's scaled_dot_product_attention to one kernel: ``flash`` (FlashAttention-2, as
    built into PyTorch), ``efficient`` (memory-efficient), ``cudnn`` or ``math``; None leaves PyTorch's choice."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if name not in kernels:
        raise ValueError(f"unknown sdpa backend {name!r}; use one of {', '.join(SDPA_BACKENDS)}")
    return sdpa_kernel(kernels[name])


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the platform has them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware() -> dict[str, Any]:
    """CPU model and cores, memory, GPU name, and library versions."""
    import transformers

    from kvcake import __version__

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "load_average": load_average()}
    try:
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:
        info["memory_bytes"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    else:
        info["gpu"] = None
    info["kvcake"] = __version__
    return info
