"""Per-group BatchNorm on a strided view: the authors' per-GPU statistics without layout copies.

`GroupedBatchNorm2d` (cclnb.training.models) normalizes G groups of samples (sample i -> group
i % G) with one `batch_norm` call over the batch reshaped to (B/G, G*C, H, W). For an activation
in channels_last memory that reshape is a copy, and so is the reshape back, whose NCHW result the
next channels_last convolution converts again: three full passes over every activation of every
BatchNorm layer, forward and backward, on top of the normalization itself.

Here the batch is only *viewed* as (B/G, G, C, H, W) (splitting the batch dimension is a view in
any memory layout), the (G, C) statistics are reductions over that view, and the output is one
fused multiply-add written in the input's own layout. The backward pass is BatchNorm's closed
form over the same view (two reductions and two fused multiply-adds), so nothing is copied there
either. Same statistics, same running-average update as `F.batch_norm` (group 0's, unbiased
variance, the module's momentum): equal to the reshape implementation to floating-point
tolerance, in float64 on the CPU (`tests/test_bn.py`).

Precision: the statistics accumulate in float32 (float64 for float64 input); under bf16
autocast the output is bf16 like cuDNN's, the per-channel scale and shift rounded to bf16 in the
multiply-add (cuDNN keeps them in float32: a difference of the order of bf16's own rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

_DIMS = (0, 3, 4)                       # of the (B/G, G, C, H, W) view: everything but (group, channel)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_statistics(xv: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased variance), each (G, C), of a (B/G, G, C, H, W) view, accumulated in float32
    (float64 for float64). Full-precision inputs use one Welford pass (`var_mean`); half-precision
    ones a sum and a sum of squares read straight from the half-precision view (on CUDA neither
    materializes a float32 copy), var = E[x^2] - mean^2 in float32."""
    acc = _accumulation_dtype(xv.dtype)
    if xv.dtype == acc:
        var, mean = torch.var_mean(xv, dim=_DIMS, correction=0)
        return mean, var
    n = xv.numel() // (xv.shape[1] * xv.shape[2])
    mean = xv.sum(dim=_DIMS, dtype=acc) / n
    square = torch.linalg.vector_norm(xv, 2, dim=_DIMS, dtype=acc).square() / n
    return mean, (square - mean.square()).clamp_(min=0.0)


def _fma(like: Tensor, shift: Tensor, a: Tensor, scale: Tensor) -> Tensor:
    """shift + a * scale as a new (B, C, H, W) tensor in the dtype and memory layout of `like`
    (B, C, H, W); `a` is a (B/G, G, C, H, W) view, `shift` and `scale` (G, C), broadcast. The
    result is the new tensor itself, not a view of one: autograd lets the next layer's in-place
    ReLU modify it."""
    out = torch.empty_like(like)
    groups, channels = scale.shape
    view = (1, groups, channels, 1, 1)
    torch.addcmul(shift.to(out.dtype).view(view), a, scale.to(out.dtype).view(view),
                  out=out.view(a.shape))
    return out


class _StridedGroupNormFn(torch.autograd.Function):
    """y = (x - mean_g) * invstd_g * weight + bias per (group, channel) of the strided view.

    Both passes run with autocast off and explicit dtypes: autocast would cast the activation to
    float32 before `sum` and `norm` (it lists them as float32 ops), a full copy, where the
    reductions already accumulate in float32 reading the bf16 values."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            return _StridedGroupNormFn._forward(ctx, x, weight, bias, groups, eps)

    @staticmethod
    def _forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
        b, c, h, w = x.shape
        xv = x.view(b // groups, groups, c, h, w)
        mean, var = group_statistics(xv)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
        y = _fma(x, shift, xv, scale)
        ctx.save_for_backward(x, mean, invstd, scale)
        ctx.groups = groups
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _mean: Tensor, _var: Tensor):
        with torch.autocast(grad_y.device.type, enabled=False):
            return _StridedGroupNormFn._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y: Tensor):
        x, mean, invstd, scale = ctx.saved_tensors
        b, c, h, w = x.shape
        groups = ctx.groups
        xv, gv = x.view(b // groups, groups, c, h, w), grad_y.view(b // groups, groups, c, h, w)
        acc = mean.dtype
        n = xv.numel() // (groups * c)
        sum_dy = gv.sum(dim=_DIMS, dtype=acc)                                    # (G, C)
        sum_dy_xhat = ((gv * xv).sum(dim=_DIMS, dtype=acc) - mean * sum_dy) * invstd
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = scale * (dy - sum_dy / n - xhat * sum_dy_xhat / n), xhat = (x - mean) * invstd
            k = sum_dy_xhat * invstd / n
            grad_x = _fma(x, scale * (k * mean - sum_dy / n), xv, -scale * k)
            grad_x.view(xv.shape).addcmul_(gv, scale.to(grad_x.dtype).view(1, groups, c, 1, 1))
        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_weight = None if weight_dtype is None else sum_dy_xhat.sum(0).to(weight_dtype)
        grad_bias = None if bias_dtype is None else sum_dy.sum(0).to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


def strided_grouped_batch_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None,
                               running_mean: Tensor | None, running_var: Tensor | None,
                               factor: float, eps: float) -> Tensor:
    """Train-mode BatchNorm of (B, C, H, W) `x` with statistics per group of samples (i -> i % G),
    in `x`'s own memory layout. When running statistics are given they move towards group 0's
    (unbiased variance) by `factor`, as `F.batch_norm`'s do."""
    y, mean, var = _StridedGroupNormFn.apply(x, weight, bias, groups, eps)
    if running_mean is not None and running_var is not None:
        n = x.numel() // (groups * x.shape[1])
        with torch.no_grad():
            running_mean.mul_(1.0 - factor).add_(mean[0].to(running_mean.dtype), alpha=factor)
            unbiased = var[0] * (n / max(n - 1, 1))
            running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return y
