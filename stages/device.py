"""The device a stage runs on, from its params' ``device: auto | cpu | cuda`` key."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from stages.cli import StageError


def resolve_device(requested: str, key: str, default: torch.device | None = None) -> torch.device:
    """A params ``device`` value as a `torch.device`.

    Args:
        requested: "auto", "cpu" or "cuda" (the schema's `Literal`).
        key: the dotted params key it came from ("extract.device"), named in the error.
        default: the launcher's device (`stages.distributed.init_distributed().device`: this
            process's GPU under torchrun/srun, else the CPU). "auto" returns it, and "cuda" returns
            it when it is a CUDA device (so each rank keeps its own GPU). None: "auto" is CUDA when
            available, else the CPU, and "cuda" is the current CUDA device.

    Returns:
        The device.

    Raises:
        StageError: "cuda" requested on a machine without CUDA (naming `key`).
    """
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise StageError(f"{key} = 'cuda' but CUDA is not available (use 'auto' or 'cpu')")
        return default if default is not None and default.type == "cuda" else torch.device("cuda")
    if requested != "auto":
        raise StageError(f"{key} = {requested!r}: allowed are 'auto', 'cpu' and 'cuda'")
    if default is not None:
        return default
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=None)
def device_constant(values: tuple[float, ...], device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`values` as a tensor on `device`, made once and then shared (callers must not write to it).

    A tensor made from Python numbers on a GPU is a blocking copy: made per batch, it would make
    the host wait for every queued kernel instead of running ahead of the GPU.
    """
    return torch.tensor(values, device=device, dtype=dtype)


def forward_precision(precision: str, device: torch.device) -> str:
    """A params ``precision: auto | bf16 | fp32`` key resolved: "auto" is bf16 on GPUs that have
    it natively, fp32 elsewhere (older GPUs would emulate bf16, slower than fp32)."""
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where `forward_precision` says bf16; no autocast (fp32) otherwise."""
    if forward_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
