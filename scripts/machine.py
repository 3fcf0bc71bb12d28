"""One line that says where and when a benchmark ran (shared by the scripts in this folder)."""

from __future__ import annotations

import platform
from datetime import datetime
from pathlib import Path

import torch


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: str | torch.device = "cpu") -> str:
    """Date, CPU (or GPU), platform, torch, threads and the load average at the start."""
    device = torch.device(device)
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (
        f"{datetime.now().isoformat(timespec='seconds')} | {chip} | {platform.platform()} | "
        f"torch {torch.__version__}, python {platform.python_version()} | "
        f"{torch.get_num_threads()} threads | device {device} | load average {' '.join(load)}"
    )
