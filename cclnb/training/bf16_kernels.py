"""bf16 autocast on a CPU without native bf16: fp32 kernels on bf16-rounded operands.

Why: on a CPU without AVX512-BF16 or AMX, torch runs autocast's bf16 convolutions and matrix
products in fallback kernels 15-30x slower than fp32 (docs/performance.md: 14.2 against 212 img/s), so a
CPU preset that pins bf16, so that records from several machines average, took days there where it
takes hours on a native CPU.

How: a native bf16 kernel multiplies bf16 operands, whose products are exact in fp32 (8-bit
significands), accumulates them in fp32 and rounds its output to bf16. Running torch's fp32 kernel
on the operands rounded to bf16 and rounding its output to bf16 computes the same thing, up to the
order of the fp32 sums: the freedom that already separates two native kernels (AMX and AVX512-BF16),
so the numbers are those of bf16 arithmetic, not bit for bit those of any one CPU. Gradients follow
without extra code: autograd differentiates through the two casts, so the backward products also
run as fp32 kernels and each gradient is rounded to bf16 where a native backward writes bf16.

Which ops: those autocast runs in bf16 on the CPU that have a matrix kernel (convolutions, linear,
the matrix products), intercepted where autocast would cast them, i.e. only while autocast is on
for the CPU in bf16: the loss code that turns autocast off keeps its exact fp32 products, and an
op missing from the list still runs in torch's own (slow, equally bf16) kernel.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
# autocast's lower-precision CPU ops that have a matrix kernel, as the Python API reaches them
MATRIX_OPS = frozenset({
    torch.conv1d, torch.conv2d, torch.conv3d,
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.addbmm, torch.baddbmm,
    _T.matmul, _T.__matmul__, _T.__rmatmul__, _T.mm, _T.bmm, _T.addmm, _T.addbmm, _T.baddbmm,
})


def _bf16_rounded(value: Any) -> Any:
    """A floating CPU tensor rounded to bf16 and held in fp32 (what autocast would cast; float64
    is not cast by autocast and is refused by the caller); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


def _autocast_casts(args: tuple, kwargs: dict) -> bool:
    """Whether autocast would run this call in bf16: CPU autocast is on in bf16, and no operand is
    float64 (autocast leaves float64 alone)."""
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    return all(t.device.type == "cpu" and t.dtype != torch.float64 for t in tensors)


class RoundedFp32Kernels(TorchFunctionMode):
    """Runs autocast's bf16 matrix ops as fp32 kernels on bf16-rounded operands, output in bf16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MATRIX_OPS or not _autocast_casts(args, kwargs):
            return func(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            result = func(*(_bf16_rounded(a) for a in args),
                          **{name: _bf16_rounded(v) for name, v in kwargs.items()})
        return result.to(torch.bfloat16)


@contextlib.contextmanager
def rounded_fp32_autocast() -> Iterator[None]:
    """CPU bf16 autocast whose matrix ops run as fp32 kernels on bf16-rounded operands."""
    with torch.autocast("cpu", dtype=torch.bfloat16), RoundedFp32Kernels():
        yield
