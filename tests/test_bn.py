"""The strided grouped BatchNorm (`--grouped-bn strided`) against today's reshape implementation:
the same outputs, gradients and running statistics in float64, in both memory layouts, through a
whole encoder; and no layout copy in its forward or backward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cclnb.errors import ConfigError
from cclnb.training.bn import _StridedGroupNormFn, group_statistics
from cclnb.training.models import Encoder, GroupedBatchNorm2d, bn_groups, build_backbone, grouped_forward, set_grouped_bn


def _pair(channels: int = 6, momentum: float | None = 0.1) -> tuple[GroupedBatchNorm2d, GroupedBatchNorm2d]:
    torch.manual_seed(0)
    ref = GroupedBatchNorm2d(channels, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    return ref, set_grouped_bn(copy.deepcopy(ref), "strided")


def _run(bn: GroupedBatchNorm2d, x: torch.Tensor, groups: int, update_stats: bool = True):
    x = x.detach().clone().requires_grad_(True)
    with bn_groups(bn, groups, update_stats):
        y = bn(x)
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y, x.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups,update_stats,momentum", [(4, True, 0.1), (4, False, 0.1), (1, False, 0.1),
                                                          (2, True, None)])
def test_strided_equals_reshape_in_float64(channels_last, groups, update_stats, momentum):
    ref, strided = _pair(momentum=momentum)
    x = torch.randn(8, 6, 5, 7, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):                      # twice: the running average moves from its second step on
        got, want = _run(strided, x, groups, update_stats), _run(ref, x, groups, update_stats)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(strided, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    if channels_last:                       # the output keeps the input's layout
        assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_the_function_passes_gradcheck():
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _StridedGroupNormFn.apply(*a, 2, 1e-5)[0], (x, weight, bias))


def test_a_whole_encoder_trains_the_same_in_float64():
    """grouped_forward through a small ResNet: every parameter's gradient and every BatchNorm
    statistic equal the reshape implementation's (channels_last input, groups 4)."""
    torch.manual_seed(1)
    ref = Encoder(build_backbone("resnet18", small_images=True, width=4), dim=8).double()
    strided = set_grouped_bn(copy.deepcopy(ref), "strided")
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for model in (ref, strided):
        model.to(memory_format=torch.channels_last)
        grouped_forward(model, x, 4).square().sum().backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), strided.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, a), (_, b) in zip(ref.named_buffers(), strided.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    assert all(m.strided for m in copy.deepcopy(strided).modules() if isinstance(m, GroupedBatchNorm2d))


def _copies(bn: GroupedBatchNorm2d, x: torch.Tensor) -> int:
    """Copies of whole activations (4-d tensors) in one forward and backward pass of `bn`."""
    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)
    with bn_groups(bn, 4), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        bn(x).backward(grad)
    return sum(1 for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::_to_copy")
               and e.input_shapes and len(e.input_shapes[0]) >= 4)


def test_no_layout_copy_forward_or_backward_on_channels_last():
    ref, strided = _pair()
    x = torch.randn(8, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert _copies(ref, x) >= 2           # the reshape in and out (the check can fail)
    assert _copies(strided, x) == 0


def test_half_precision_statistics_accumulate_in_float32():
    """bf16 input: statistics from a float32 sum and sum of squares of the bf16 values (the CUDA
    autocast path) equal float64 statistics of the same values, and the output is bf16."""
    x = (torch.randn(8, 6, 5, 7) * 2 + 3).to(torch.bfloat16)
    view = x.view(2, 4, 6, 5, 7)
    mean, var = group_statistics(view)
    want_var, want_mean = torch.var_mean(view.double(), dim=(0, 3, 4), correction=0)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=1e-4)
    ref, strided = _pair()
    with bn_groups(strided.float(), 4):
        y = strided(x)
    with bn_groups(ref.float(), 4):
        want = ref(x.float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=0, atol=0.05)


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ConfigError, match="--grouped-bn must be one of reshape, strided"):
        set_grouped_bn(GroupedBatchNorm2d(3), "fused")
