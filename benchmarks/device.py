"""What a benchmark line says about the machine it ran on."""

from __future__ import annotations

import os
import platform
import re

import torch

# Dense bf16 peak of the cards we are lent, FLOP/s (vendor datasheets, SXM parts).
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# CPU features that change what a CPU benchmark measures (bf16/int8 matrix units, vector width).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> tuple[str, set[str]]:
    """This machine's CPU model name and feature flags (Linux /proc/cpuinfo; elsewhere the
    platform's processor name and no flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    return (model.group(1).strip() if model else platform.machine()), set(flags.group(1).split() if flags else ())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = cpu_info()
    listed = " ".join(flag for flag in CPU_FLAGS if flag in flags) or "no AVX2"
    return f"{model} (cpu x{os.cpu_count()}, {torch.get_num_threads()} threads; {listed})"


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
