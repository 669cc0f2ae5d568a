"""Networks of the study: the ResNet backbone, the projection head, and MoCo v2.

Parameter names follow torchvision (`conv1`, `bn1`, `layer1..4`) so that the authors' checkpoints
(`module.encoder_q.conv1.weight`, ...) map onto ours by stripping a prefix; see `cclnb.training.checkpoint`.

Per-GPU BatchNorm. The authors train on 8 GPUs without SyncBatchNorm, so every train-mode forward
(query, key, CCL's anchor and teacher passes) normalizes over one GPU's 32 samples, and DDP then
keeps rank 0's running statistics (it broadcasts buffers from rank 0 before every forward). One
cclnb process reproduces that with `grouped_forward`: the batch is cut into `groups` consecutive
slices (slice g = what GPU g held), each normalized with its own statistics in one `batch_norm`
call (`GroupedBatchNorm2d`), and the running statistics follow slice 0. MoCo's key encoder
additionally needs the batch *shuffled* first (`MoCo.key_forward`): if the keys of a batch were
normalized with that batch's own statistics, the query/key pair of an image could recognise each
other through the statistics and the contrastive task would be solved by cheating.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cclnb.config import ARCHS, GROUPED_BN, STEMS, resolve_stem
from cclnb.errors import ConfigError
from cclnb.training.bn import strided_grouped_batch_norm

_OUT_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
_B, _N = torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck
_RESNET_LAYOUT = {"resnet18": (_B, [2, 2, 2, 2]), "resnet34": (_B, [3, 4, 6, 3]), "resnet50": (_N, [3, 4, 6, 3]),
                  "resnet101": (_N, [3, 4, 23, 3]), "resnet152": (_N, [3, 8, 36, 3])}
DEFAULT_WIDTH = 64   # torchvision's first-stage channels


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same parameters, buffers and state_dict keys) that, in training mode,
    normalizes each of `groups` groups of samples with its own statistics, and can leave its
    running statistics untouched (`update_stats=False`).

    Samples are assigned to groups by position modulo `groups` (sample i -> group i % groups), which
    lets one `batch_norm` call do the work: (B, C, H, W) is viewed as (B/G, G*C, H, W), every group
    becomes G*C "channels". `grouped_forward` reorders a batch so that these groups are its
    consecutive slices. The running statistics are updated with group 0's statistics only, which
    is what DDP holds after each step (rank 0's buffers win), so one process with G groups keeps
    the same statistics as G ranks.
    """

    groups: int = 1
    update_stats: bool = True
    strided: bool = False       # normalize on a strided view, no layout copies (cclnb.training.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.groups
        if not self.training or (groups <= 1 and self.update_stats):
            return super().forward(x)
        b, c, h, w = x.shape
        if b % groups:
            raise ConfigError(
                f"a batch of {b} samples cannot be split into {groups} equal BatchNorm groups; choose "
                f"a batch size divisible by --bn-groups / --key-bn-groups (now {groups}) or set it to 1")
        stats = self.update_stats and self.track_running_stats and self.running_mean is not None
        factor = self._average_factor() if stats else 0.0
        if self.strided:
            return strided_grouped_batch_norm(x, groups, self.weight, self.bias,
                                              self.running_mean if stats else None,
                                              self.running_var if stats else None, factor, self.eps)
        mean = self.running_mean.repeat(groups) if stats else None
        var = self.running_var.repeat(groups) if stats else None
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        y = F.batch_norm(x.reshape(b // groups, groups * c, h, w), mean, var, weight, bias,
                         True, factor, self.eps)
        if stats:
            with torch.no_grad():
                self.running_mean.copy_(mean[:c])
                self.running_var.copy_(var[:c])
        return y.reshape(b, c, h, w)

    def _average_factor(self) -> float:
        """The running-average weight of this step, as `nn.BatchNorm2d` computes it (momentum, or a
        cumulative average when momentum is None), counting the step once for all groups."""
        if not self.track_running_stats or self.num_batches_tracked is None:
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def set_grouped_bn(module: nn.Module, impl: str) -> nn.Module:
    """Every `GroupedBatchNorm2d` of `module` normalizes its groups by `impl`: "reshape" (one
    `batch_norm` over the batch reshaped into channels, the default) or "strided" (reductions over
    a strided view: the same numbers without layout copies, `cclnb.training.bn`). Copies made
    later (the key encoder, a teacher) keep the choice."""
    if impl not in GROUPED_BN:
        raise ConfigError(f"--grouped-bn must be one of {', '.join(GROUPED_BN)}, got {impl!r}")
    for m in module.modules():
        if isinstance(m, GroupedBatchNorm2d):
            m.strided = impl == "strided"
    return module


@contextlib.contextmanager
def bn_groups(module: nn.Module, groups: int, update_stats: bool = True) -> Iterator[None]:
    """Within the block, every `GroupedBatchNorm2d` of `module` normalizes in `groups` groups
    (by position modulo `groups`) and updates its running statistics only if `update_stats`."""
    layers = [m for m in module.modules() if isinstance(m, GroupedBatchNorm2d)]
    previous = [(m.groups, m.update_stats) for m in layers]
    for m in layers:
        m.groups, m.update_stats = groups, update_stats
    try:
        yield
    finally:
        for m, (g, u) in zip(layers, previous):
            m.groups, m.update_stats = g, u


def slice_interleave(batch: int, groups: int, device: torch.device | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): `x[order]` puts row g*n + j of a batch (slice g, n = batch/groups) at
    position j*groups + g, so BatchNorm's modulo groups become the batch's consecutive slices;
    `y[inverse]` puts the rows back."""
    n = batch // groups
    order = torch.arange(batch, device=device).view(groups, n).t().reshape(-1)
    inverse = torch.arange(batch, device=device).view(n, groups).t().reshape(-1)
    return order, inverse


def grouped_forward(module: nn.Module, x: torch.Tensor, groups: int, update_stats: bool = True,
                    forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`module(x)` (or `forward(x)`, e.g. its compiled twin) with per-slice BatchNorm in train mode.

    The batch is cut into `groups` consecutive slices, each normalized with its own statistics, as
    `groups` GPUs without SyncBatchNorm would each normalize their share of the batch; the running
    statistics follow slice 0 (rank 0's, which DDP keeps), or stay as they are when `update_stats`
    is False (a rank that skips this forward). Rows come back in the input's order. In eval mode
    this is `module(x)`.
    """
    run = forward if forward is not None else module
    if not module.training:
        return run(x)
    if groups <= 1:
        with bn_groups(module, 1, update_stats):
            return run(x)
    if x.shape[0] % groups:
        raise ConfigError(f"a batch of {x.shape[0]} samples cannot be split into {groups} equal "
                          f"BatchNorm groups; choose a batch size divisible by --bn-groups (now "
                          f"{groups}) or set --bn-groups 1")
    order, inverse = slice_interleave(x.shape[0], groups, x.device)
    with bn_groups(module, groups, update_stats):
        y = run(x[order])
    return y[inverse]


@torch.no_grad()
def copy_parameters(source: nn.Module, target: nn.Module) -> None:
    """target's parameters := source's; buffers (BatchNorm statistics) stay target's own. This is
    how the authors reset the key encoder and the teacher at a task start."""
    torch._foreach_copy_(list(target.parameters()), [p.detach() for p in source.parameters()])


def reset_bn_statistics(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` back to its initial statistics (mean 0, variance 1, 0 batches
    seen): what a freshly built network holds."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return module


def build_backbone(arch: str, small_images: bool | None = None, stem: str = "auto",
                   width: int = DEFAULT_WIDTH) -> nn.Module:
    """A torchvision ResNet without its classifier (`fc = Identity`), with `out_dim` set.

    `stem="cifar"` (or `"auto"` with `small_images`) swaps the 7x7/2 convolution and max-pool for a
    3x3/1 convolution and no pooling: at 32 px the ImageNet stem would shrink the image to 8 px
    before the first residual block and waste most of the network. `stem="cifar_pool"` keeps the
    max-pool after the 3x3/1 convolution: 16 px at the first block, about a third of the CIFAR
    stem's CPU time, with a 2x2 map left at the last block where the ImageNet stem leaves 1x1.

    `width` is the channel count of the first stage (torchvision's 64; the later stages double it,
    the stem follows it). A narrower network is how a CPU budget keeps every pixel of a 32 px image:
    at width 16 the 3x3 stem costs less per image than the full-width ImageNet stem. The default
    builds torchvision's network unchanged (same modules, same random draws).
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ConfigError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if width < 1:
        raise ConfigError(f"--width must be >= 1 (channels of the first stage; 64 = torchvision's), got {width}")
    if width == DEFAULT_WIDTH:
        net = getattr(torchvision.models, arch)(weights=None, norm_layer=GroupedBatchNorm2d)
    else:
        net = _NarrowResNet(width, *_RESNET_LAYOUT[arch], norm_layer=GroupedBatchNorm2d)
    stem = resolve_stem(stem, small_images)
    if stem in ("cifar", "cifar_pool"):
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if stem != "cifar_pool":
            net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_dim = _OUT_DIMS[arch] * width // DEFAULT_WIDTH
    return net


class _NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with every stage's channels scaled by `width / 64` (stem included)."""

    def __init__(self, width: int, block: type[nn.Module], layers: list[int], **kwargs) -> None:
        self._width = width
        super().__init__(block, layers, **kwargs)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        if planes == DEFAULT_WIDTH:           # the first stage: it follows the stem, built at `width` below
            self.inplanes = self._width
            self.conv1 = nn.Conv2d(3, self._width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = self._norm_layer(self._width)
        return super()._make_layer(block, planes * self._width // DEFAULT_WIDTH, blocks, stride, dilate)


class Encoder(nn.Module):
    """Backbone + projection head; `forward` returns the *unnormalized* embedding (the losses and
    MoCo normalize), so the same module serves as query encoder, key encoder and CCL teacher."""

    def __init__(self, backbone: nn.Module, dim: int = 128, mlp: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, dim)) if mlp else nn.Linear(d, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MoCo(nn.Module):
    """MoCo v2: query encoder (trained), key encoder (momentum copy) and a FIFO queue of keys.

    The training step itself lives in the trainer; this module holds the state and the pieces a
    step needs: `forward` (the differentiable query path, so DDP wrapping this module syncs the
    query gradients), `key_forward`, `momentum_update`, `enqueue`.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, arch: str, dim: int = 128, k: int = 65536, mlp: bool = True,
                 small_images: bool | None = None, stem: str = "auto", width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"--moco-k must be >= 1, got {k}")
        self.encoder_q = Encoder(build_backbone(arch, small_images, stem, width), dim, mlp)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, k), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, im_q: torch.Tensor) -> torch.Tensor:
        """L2-normalized query embeddings (B, dim)."""
        return F.normalize(self.encoder_q(im_q), dim=1)

    @torch.no_grad()
    def key_forward(self, im_k: torch.Tensor, groups: int = 1,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """L2-normalized key embeddings (B, dim), computed with shuffled, grouped BatchNorm.

        The batch is permuted (with `generator`, for reproducibility), cut into `groups`
        consecutive slices of the permuted order, each normalized with its own statistics (what
        the authors' GPUs do after their cross-GPU shuffle), and put back in the original order.
        """
        b = im_k.shape[0]
        device = generator.device if generator is not None else im_k.device
        perm = torch.randperm(b, generator=generator, device=device).to(im_k.device)
        k = self.key_embed(im_k[perm], groups)
        unshuffled = torch.empty_like(k)
        unshuffled[perm] = k
        return unshuffled

    @torch.no_grad()
    def key_embed(self, im_k: torch.Tensor, groups: int) -> torch.Tensor:
        """L2-normalized key embeddings of an already shuffled batch, BN per consecutive slice (the
        per-rank part of the cross-GPU shuffle under DDP)."""
        return F.normalize(grouped_forward(self.encoder_k, im_k, groups), dim=1)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """key = m * key + (1 - m) * query, parameters only (BN statistics stay the key's own)."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - m)

    @torch.no_grad()
    def copy_query_to_key(self) -> None:
        """key encoder's parameters := the query encoder's (start of training and of every task).

        Parameters only, as the authors' `reset_k`: the key encoder keeps its own BatchNorm
        statistics. (They are never used: the key encoder only runs in train mode.)"""
        copy_parameters(self.encoder_q, self.encoder_k)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (B, dim) over the oldest entries, wrapping around the end of the queue.

        Any batch size works (the authors require K % B == 0); with B > K only the newest K keys
        survive, exactly as if they had been written one by one. No host sync: the pointer stays
        on the device.
        """
        k = self.queue.shape[1]
        b = keys.shape[0]
        skip = max(0, b - k)
        keys = keys[skip:]
        idx = (self.queue_ptr + skip + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue.index_copy_(1, idx, keys.t().to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + b) % k)
