"""A dispatch mode that records the operations which, on a GPU, make the host wait for the device:
reading a value back, or making a tensor from Python numbers (a blocking copy to the device).
Run on the CPU, it shows code free of them before any GPU sees it."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

WAITS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
         torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default,
         torch.ops.aten.lift_fresh.default}


class HostWaits(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in WAITS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))
