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


@pytest.mark.timeout(120)
def test_group_sampler_sums_a_busy_child_and_its_grandchild():
    import psutil

    code = ("import subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "while True: pass\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        sampler = GroupSampler(proc.pid)
        deadline = time.monotonic() + 60  # a hang guard: the grandchild starts in well under 1 s
        while True:
            first = sampler.sample()
            if first.n_procs == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert first.n_procs == 2 and first.rss_mb > 1
        # let the busy loop burn 0.2 s of CPU since that sample, however long a busy machine takes
        busy = psutil.Process(proc.pid)
        used = sum(busy.cpu_times()[:2])
        while sum(busy.cpu_times()[:2]) < used + 0.2:
            time.sleep(0.05)
        second = sampler.sample()
        assert second.cpu_percent > 0  # primed at discovery: the second sample sees the loop's CPU
        assert proc.pid in second.pids
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60  # the grandchild dies with the group (zombies do not count)
    while sampler.sample().n_procs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sampler.sample().n_procs == 0
