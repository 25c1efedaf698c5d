"""GPU listing degrades to [] with a reason without NVML; process-group sampling with psutil."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ebft_tui.system.gpus import GpuInfo, gpu_memory_by_pid, list_gpus, nvml_unavailable_reason, pick_free_gpus
from ebft_tui.system.procs import GroupSampler


def test_list_gpus_never_raises():
    gpus = list_gpus()
    reason = nvml_unavailable_reason()
    if gpus:
        assert reason is None and all(isinstance(g, GpuInfo) for g in gpus)
        assert [g.index for g in gpus] == list(range(len(gpus)))
    else:
        assert gpu_memory_by_pid() == {} and pick_free_gpus(2) == []
        if reason is not None:
            assert "NVML" in reason or "nvidia-ml-py" in reason


def test_gpu_info_free_memory():
    g = GpuInfo(0, "X", 10.0, 1024.0, 4096.0)
    assert g.mem_free_mb == 3072.0 and g.as_dict()["mem_free_mb"] == 3072.0
    assert GpuInfo(1, "Y", None, None, None).mem_free_mb is None


@pytest.mark.timeout(30)
def test_group_sampler_sums_a_busy_child_and_its_grandchild():
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "t = time.time()\n"
            "while time.time() - t < 20: pass\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        sampler = GroupSampler(proc.pid)
        deadline = time.monotonic() + 10
        while True:
            first = sampler.sample()
            if first.n_procs == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert first.n_procs == 2 and first.rss_mb > 1
        time.sleep(0.5)
        second = sampler.sample()
        assert second.cpu_percent > 20  # primed: the second sample measures the busy loop
        assert proc.pid in second.pids
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.1)
    assert sampler.sample().n_procs == 0
