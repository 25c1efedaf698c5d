"""GPUs through NVML (`nvidia-ml-py`, module `pynvml`), tolerant of everything missing.

On a machine without an NVIDIA driver `list_gpus()` returns [] and `nvml_unavailable_reason()`
says why; unsupported fields (temperature, power on some boards) are None. NVML is slow: sample
at most about once a second, from a thread, never in the event loop.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

_lock = threading.Lock()
_state: dict[str, object] = {"init": False, "reason": None}


@dataclass
class GpuInfo:
    index: int
    name: str
    util_percent: float | None
    mem_used_mb: float | None
    mem_total_mb: float | None
    temperature_c: float | None = None
    power_w: float | None = None

    @property
    def mem_free_mb(self) -> float | None:
        if self.mem_used_mb is None or self.mem_total_mb is None:
            return None
        return self.mem_total_mb - self.mem_used_mb

    def as_dict(self) -> dict:
        return {
            "index": self.index, "name": self.name, "util_percent": self.util_percent,
            "mem_used_mb": self.mem_used_mb, "mem_total_mb": self.mem_total_mb,
            "mem_free_mb": self.mem_free_mb, "temperature_c": self.temperature_c, "power_w": self.power_w,
        }


def _nvml():
    """The initialised pynvml module, or None (reason in `nvml_unavailable_reason()`)."""
    with _lock:
        if _state["init"]:
            import pynvml

            return pynvml
        if _state["reason"] is not None:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pynvml
        except ImportError:
            _state["reason"] = "nvidia-ml-py is not installed"
            return None
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            _state["reason"] = f"NVML unavailable: {e.__class__.__name__.replace('NVMLError_', '')}"
            return None
        _state["init"] = True
        return pynvml


def nvml_unavailable_reason() -> str | None:
    """None when NVML works, else a short reason ("NVML unavailable: LibraryNotFound")."""
    _nvml()
    return _state["reason"]  # type: ignore[return-value]


def _q(fn, *args, default=None):
    try:
        return fn(*args)
    except Exception:
        return default


def _name(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def list_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees, by NVML index (use with `CUDA_DEVICE_ORDER=PCI_BUS_ID`)."""
    nv = _nvml()
    if nv is None:
        return []
    count = _q(nv.nvmlDeviceGetCount, default=0) or 0
    out = []
    for i in range(count):
        h = _q(nv.nvmlDeviceGetHandleByIndex, i)
        if h is None:
            continue
        util = _q(nv.nvmlDeviceGetUtilizationRates, h)
        mem = _q(nv.nvmlDeviceGetMemoryInfo, h)
        temp = _q(nv.nvmlDeviceGetTemperature, h, 0)  # NVML_TEMPERATURE_GPU
        power = _q(nv.nvmlDeviceGetPowerUsage, h)
        out.append(GpuInfo(
            index=i,
            name=_name(_q(nv.nvmlDeviceGetName, h, default="GPU")),
            util_percent=float(util.gpu) if util is not None else None,
            mem_used_mb=mem.used / 2**20 if mem is not None else None,
            mem_total_mb=mem.total / 2**20 if mem is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power / 1000.0 if power is not None else None,
        ))
    return out


def gpu_memory_by_pid() -> dict[int, float]:
    """MiB of GPU memory per PID over all GPUs. In containers NVML may report host PIDs that
    match none of ours: callers show "n/a" then."""
    nv = _nvml()
    if nv is None:
        return {}
    out: dict[int, float] = {}
    for i in range(_q(nv.nvmlDeviceGetCount, default=0) or 0):
        h = _q(nv.nvmlDeviceGetHandleByIndex, i)
        if h is None:
            continue
        for p in _q(nv.nvmlDeviceGetComputeRunningProcesses, h, default=[]) or []:
            used = getattr(p, "usedGpuMemory", None)
            if used is not None:
                out[p.pid] = out.get(p.pid, 0.0) + used / 2**20
    return out


def pick_free_gpus(n: int, max_util: float = 10.0, min_free_mb: float = 0.0) -> list[int]:
    """Up to `n` GPU indices below the utilisation threshold with the most free memory first."""
    gpus = [g for g in list_gpus()
            if (g.util_percent is None or g.util_percent <= max_util)
            and (g.mem_free_mb is None or g.mem_free_mb >= min_free_mb)]
    gpus.sort(key=lambda g: -(g.mem_free_mb or 0.0))
    return sorted(g.index for g in gpus[:n])
