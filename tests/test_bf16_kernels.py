"""bf16 on a CPU without native bf16: fp32 kernels on bf16-rounded operands compute bf16's numbers.

The reference is torch's own bf16 autocast on this CPU (native kernels where the CPU has them,
torch's emulation elsewhere): a bf16 kernel accumulates exact products in fp32 and rounds once, so
the two agree up to the order of the fp32 sums, i.e. at most one bf16 step apart per element.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cclnb.training import precision
from cclnb.training.bf16_kernels import rounded_fp32_autocast
from cclnb.training.losses import info_nce_logits

BF16_STEP = 2.0 ** -7     # bf16's relative spacing (8-bit significand)


def _within_one_bf16_step(ours: torch.Tensor, torch_bf16: torch.Tensor) -> None:
    assert ours.dtype == torch_bf16.dtype
    a, b = ours.float(), torch_bf16.float()
    assert torch.all((a - b).abs() <= BF16_STEP * b.abs() + 1e-6)
    assert (a == b).float().mean() > 0.99      # most elements are bit-equal: the same rounding


def _conv_and_linear(x: torch.Tensor, conv_w: torch.Tensor, fc_w: torch.Tensor, fc_b: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    h = F.conv2d(x, conv_w, padding=1)
    return h, F.linear(h.float().mean((2, 3)), fc_w, fc_b)


def test_forward_matches_torch_bf16_autocast_within_one_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(8, 16, 12, 12, generator=g), torch.randn(24, 16, 3, 3, generator=g),
            torch.randn(10, 24, generator=g), torch.randn(10, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _conv_and_linear(*args)
        products = (torch.mm(args[2], args[2].t()), args[2] @ args[2].t())
    with rounded_fp32_autocast():
        ours = _conv_and_linear(*args)
        our_products = (torch.mm(args[2], args[2].t()), args[2] @ args[2].t())
    for a, b in zip((*ours, *our_products), (*reference, *products)):
        _within_one_bf16_step(a, b)


def test_gradients_have_autocasts_dtypes_and_bf16_values() -> None:
    """Autograd differentiates through the casts: the weights' gradients arrive in fp32 (as under
    autocast) and agree with torch's bf16 backward to bf16 precision."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, 12, 12, generator=g)
    weights = [torch.randn(24, 16, 3, 3, generator=g), torch.randn(10, 24, generator=g), torch.randn(10, generator=g)]

    def grads(context) -> list[torch.Tensor]:
        leaves = [w.clone().requires_grad_() for w in weights]
        xi = x.clone().requires_grad_()
        with context():
            _, out = _conv_and_linear(xi, *leaves)
        out.float().square().sum().backward()
        return [xi.grad, *(w.grad for w in leaves)]

    ours = grads(rounded_fp32_autocast)
    reference = grads(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() <= 4 * BF16_STEP * b.norm()


def test_code_that_turns_autocast_off_keeps_exact_fp32_and_float64_is_left_alone() -> None:
    """The logits are formed with autocast off (losses.py): they must stay exact fp32 products."""
    g = torch.Generator().manual_seed(2)
    q, k = F.normalize(torch.randn(4, 8, generator=g), dim=1), F.normalize(torch.randn(4, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 32, generator=g), dim=0)
    with rounded_fp32_autocast():
        logits = info_nce_logits(q, k, queue, 0.2)
        wide = torch.mm(q.double(), queue.double())
    assert logits.dtype == torch.float32
    assert torch.equal(logits, info_nce_logits(q, k, queue, 0.2))
    assert wide.dtype == torch.float64 and torch.equal(wide, q.double() @ queue.double())


@pytest.mark.parametrize("native", [False, True])
def test_autocast_uses_the_rounded_kernels_only_where_bf16_is_emulated(monkeypatch: pytest.MonkeyPatch,
                                                                       native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    context = precision.autocast(torch.device("cpu"), "bf16")
    assert isinstance(context, torch.autocast) is native
    assert isinstance(precision.autocast(torch.device("cpu"), "fp32"), torch.autocast)
