"""What a benchmark line says about the machine it ran on."""

from __future__ import annotations

import os
import platform

import torch

# Dense bf16 peak of the cards we are lent, FLOP/s (vendor datasheets, SXM parts).
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu x{os.cpu_count()} ({torch.get_num_threads()} threads)"


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
