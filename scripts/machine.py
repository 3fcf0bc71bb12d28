"""What the scripts in this folder share: one line that says where and when a benchmark ran,
the allocator option, the options of a script that times optimizer steps, and MNIST images
ready for a network (timing.py times them)."""

from __future__ import annotations

import argparse
import os
import platform
from datetime import datetime
from pathlib import Path

import torch

from penrun.data import load_dataset, normalize
from penrun.train.devices import keep_freed_memory


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


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator settings alone (a job keeps freed memory: keep_freed_memory)",
    )


def set_allocator(args: argparse.Namespace) -> None:
    """As a penrun job does, unless --default-allocator."""
    if not args.default_allocator:
        keep_freed_memory()


# penrun's LeNet-5 as the tables' MNIST teacher has it (d = 64, cosine head).
LENET5 = dict(arch="lenet5", channels=1, image_size=28, num_classes=10, penultimate_dim=64, head="cosine")


def step_options(description: str | None, steps: int) -> argparse.ArgumentParser:
    """--steps (timed per round), --batch, --threads and --device: a script that times steps."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", "--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    return parser


def start(args: argparse.Namespace) -> torch.device:
    """The torch threads set as asked; the device."""
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def mnist_images(device: torch.device, count: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` MNIST training images, normalized, and their labels, on the device."""
    data = load_dataset("mnist", data_dir=os.environ.get("PENRUN_DATA_DIR"))
    return normalize(data.x_train[:count]).to(device), data.y_train[:count].to(device)
