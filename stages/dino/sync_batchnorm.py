"""BatchNorm whose batch statistics span all ranks, on any backend (gloo on CPU included).

The reference converts every BatchNorm to `nn.SyncBatchNorm` when it trains distributed, so the
DINO head's BN normalises with the statistics of the global batch. torch's SyncBatchNorm runs on
CUDA tensors only; `DistributedBatchNorm` does the same on any device: in training mode it
all-reduces the per-channel sum, sum of squares and count with a differentiable all-reduce, so
its backward is that of BatchNorm over the whole global batch. In eval mode, or without an
initialised process group of more than one rank, it is exactly `nn.BatchNorm`. Its state-dict keys
and version are those of `nn.BatchNorm1d`/`2d`/`3d`, so checkpoints load into plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _syncing() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks: what
    `torch.distributed.nn.functional.all_reduce` does, which torch 2.14 deprecates without a
    differentiable replacement."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, ...) inputs with statistics of the global batch (all ranks of the
    default process group) in training mode; arguments as `nn.BatchNorm1d`.

    The reduction is over every dimension but C, as nn.BatchNorm*d; ranks may hold different N.
    Statistics are computed in float64 and the input is normalised in float32, also under
    autocast; the output has the input's dtype.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DistributedBatchNorm: expected an input of shape (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _syncing()):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        if channels != self.num_features:
            raise ValueError(f"DistributedBatchNorm: expected {self.num_features} channels, got {channels}")
        with torch.autocast(input.device.type, enabled=False):
            x = input.float()
            dims = [d for d in range(x.dim()) if d != 1]
            count = torch.tensor([x.numel() // channels], dtype=torch.float64, device=x.device)
            # Sums in float64: E[x²] − E[x]² cancels the leading digits when |mean| >> std. One
            # collective for all three; its backward all-reduces their gradients, so every rank
            # receives the whole global batch's contribution to d(loss)/d(stats).
            x64 = x.double()
            local = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count])
            total = _AllReduceSum.apply(local)
            n = float(total[-1].detach())  # equal on every rank: all ranks take the same branch
            if n <= 1:
                raise ValueError(f"DistributedBatchNorm: expected more than 1 value per channel when "
                                 f"training, got {n:.0f} over all ranks")
            mean = total[:channels] / n
            var = (total[channels:-1] / n - mean * mean).clamp_min(0.0)  # biased: BN normalises with it
            self._update_running_stats(mean.detach(), var.detach() * (n / (n - 1)))
            shape = [1, channels] + [1] * (x.dim() - 2)
            # x − mean first (as nn.BatchNorm): folding the mean into one shift would cancel digits.
            output = (x - mean.float().view(shape)) * torch.rsqrt(var + self.eps).float().view(shape)
            if self.affine:
                output = output * self.weight.float().view(shape) + self.bias.float().view(shape)
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As nn.BatchNorm: momentum, or a cumulative average when momentum is None."""
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any submodule is a BatchNorm (the reference's `utils.has_batchnorms`)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def convert_distributed_batchnorm(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm*d (and nn.SyncBatchNorm) in `module` becomes a DistributedBatchNorm
    holding the same parameter and buffer objects, in place for children; returns the module
    (a new one if `module` itself is a BatchNorm), as `nn.SyncBatchNorm.convert_sync_batchnorm`."""
    if isinstance(module, _BatchNorm) and not isinstance(module, DistributedBatchNorm):
        converted = DistributedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        # The same buffers too (running stats, num_batches_tracked; None in both if untracked).
        for name, buffer in module.named_buffers(recurse=False):
            converted.register_buffer(name, buffer)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        new_child = convert_distributed_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
