"""BatchNorm over the global batch when several processes share it, so 1 and N processes train alike.

With plain BatchNorm each process would normalise with the statistics of its own share of the batch, and
N processes would train a different model than one. On CUDA torch's ``SyncBatchNorm`` (fused kernels) does
the job; it refuses CPU tensors, so on CPU (gloo) :class:`AllReduceBatchNorm2d` does the same with two
differentiable all-reduces (the sum, then the squared deviations from the global mean). Its backward
all-reduces the gradients of those sums, as SyncBatchNorm's does; in float64 its gradients equal one
process's BatchNorm on the whole batch to ~1e-14.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients (what
    ``torch.distributed.nn.functional.all_reduce`` does; that one is deprecated for a private module)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the batch across all processes."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # half/bf16 statistics in float32
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.square().sum((0, 2, 3))) / n  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)  # running_var is unbiased, as torch's
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(input.dtype)


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm2d of ``model`` use global-batch statistics (call when world size > 1)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        like = next(module.buffers())  # running_mean: the layer's device and dtype
        replacement = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                           module.track_running_stats, device=like.device, dtype=like.dtype)
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
