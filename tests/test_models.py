"""Backbone shapes and names, grouped key BatchNorm, MoCo's queue and momentum update."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from cclnb.errors import ConfigError
from cclnb.training.models import (Encoder, GroupedBatchNorm2d, MoCo, bn_groups, build_backbone,
                                   copy_parameters, grouped_forward, reset_bn_statistics)


@pytest.fixture(scope="module")
def moco() -> MoCo:
    torch.manual_seed(0)
    return MoCo("resnet18", dim=16, k=10, mlp=True, small_images=True)


def test_backbone_stems_and_output() -> None:
    small = build_backbone("resnet18", small_images=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity) and isinstance(small.fc, nn.Identity)
    assert small.out_dim == 512
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 512)
    assert build_backbone("resnet18", small_images=False).conv1.kernel_size == (7, 7)
    assert build_backbone("resnet18", small_images=True, stem="imagenet").conv1.kernel_size == (7, 7)
    assert build_backbone("resnet18", stem="cifar").conv1.kernel_size == (3, 3)
    assert build_backbone("resnet50", small_images=True).out_dim == 2048


@pytest.mark.parametrize("stem, first_block_px", [("imagenet", 8), ("cifar_pool", 16), ("cifar", 32)])
def test_stem_sets_the_first_blocks_resolution(stem: str, first_block_px: int) -> None:
    """What each stem is for: at 32 px the first residual block sees 8, 16 or 32 px."""
    net = build_backbone("resnet18", stem=stem).eval()
    x = torch.randn(1, 3, 32, 32)
    seen = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    assert seen.shape[-2:] == (first_block_px, first_block_px)
    assert net(x).shape == (1, 512)


def test_backbone_keeps_torchvision_names() -> None:
    ours = set(build_backbone("resnet18", small_images=False).state_dict())
    theirs = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert ours == theirs


@pytest.mark.parametrize("arch, stem", [("resnet19", "auto"), ("resnet18", "tiny")])
def test_backbone_rejects_unknown_names(arch: str, stem: str) -> None:
    with pytest.raises(ConfigError, match="choose"):
        build_backbone(arch, small_images=True, stem=stem)


def test_encoder_head() -> None:
    enc = Encoder(build_backbone("resnet18", small_images=True), dim=8, mlp=True)
    assert [type(m) for m in enc.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert enc.head[0].in_features == enc.head[0].out_features == 512 and enc.head[2].out_features == 8
    assert isinstance(Encoder(build_backbone("resnet18", small_images=True), dim=8, mlp=False).head, nn.Linear)


def test_grouped_batchnorm_equals_per_group_batchnorm() -> None:
    torch.manual_seed(0)
    bn = GroupedBatchNorm2d(3, momentum=0.1)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    x = torch.randn(12, 3, 4, 4) * 3 + 1
    refs = [copy.deepcopy(bn) for _ in range(4)]
    with bn_groups(bn, 4):
        y = bn(x)
    assert bn.groups == 1                                # restored after the block
    for g, ref in enumerate(refs):
        torch.testing.assert_close(y[g::4], nn.BatchNorm2d.forward(ref, x[g::4]))
    # running statistics follow group 0, as DDP keeps rank 0's buffers
    torch.testing.assert_close(bn.running_mean, refs[0].running_mean)
    torch.testing.assert_close(bn.running_var, refs[0].running_var)
    assert int(bn.num_batches_tracked) == 1


def test_grouped_batchnorm_can_leave_statistics_alone() -> None:
    bn = GroupedBatchNorm2d(3)
    x = torch.randn(8, 3, 2, 2) + 2
    ref = nn.BatchNorm2d(3)
    for groups in (1, 4):
        with bn_groups(bn, groups, update_stats=False):
            y = bn(x)
        assert float(bn.running_mean.abs().sum()) == 0 and int(bn.num_batches_tracked) == 0
    torch.testing.assert_close(y[0::4], ref(x[0::4]))       # still normalized with batch statistics


def test_grouped_forward_normalizes_consecutive_slices(moco: MoCo) -> None:
    """Slice g of the batch (rows g*n .. g*n+n-1) through BN alone = what GPU g computes."""
    enc = copy.deepcopy(moco.encoder_q).train()                              # the fixture is shared
    ref = copy.deepcopy(enc)
    x = torch.randn(8, 3, 8, 8)
    y = grouped_forward(enc, x, 4)
    refs = [copy.deepcopy(ref) for _ in range(4)]
    with torch.no_grad():
        for g in range(4):
            torch.testing.assert_close(y[2 * g:2 * g + 2], refs[g](x[2 * g:2 * g + 2]), atol=1e-5, rtol=1e-4)
    for name, buffer in enc.state_dict().items():      # statistics: slice 0's
        torch.testing.assert_close(buffer, refs[0].state_dict()[name])
    enc.eval()
    torch.testing.assert_close(grouped_forward(enc, x, 4), enc(x))


def test_copy_parameters_keeps_buffers(moco: MoCo) -> None:
    src, dst = copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_q)   # the fixture is shared
    before = {name: b.clone() for name, b in dst.named_buffers()}
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
        src.backbone.bn1.running_mean.fill_(3.0)
    copy_parameters(src, dst)
    for a, b in zip(src.parameters(), dst.parameters()):
        torch.testing.assert_close(a, b)
    for name, b in dst.named_buffers():
        torch.testing.assert_close(b, before[name])
    reset_bn_statistics(src)
    assert float(src.backbone.bn1.running_mean.abs().sum()) == 0


def test_grouped_batchnorm_plain_when_one_group_or_eval() -> None:
    torch.manual_seed(0)
    bn, ref = GroupedBatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(bn(x), ref(x))
    bn.eval()
    ref.eval()
    with bn_groups(bn, 3):
        torch.testing.assert_close(bn(x), ref(x))


def test_grouped_batchnorm_ragged_batch_is_refused() -> None:
    bn = GroupedBatchNorm2d(2)
    with bn_groups(bn, 4), pytest.raises(ConfigError, match="key-bn-groups"):
        bn(torch.randn(6, 2, 2, 2))


def test_key_forward_shuffles_and_groups(moco: MoCo) -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 3, 8, 8)
    keys = moco.key_forward(x, groups=2, generator=torch.Generator().manual_seed(5))
    assert keys.shape == (8, 16)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(8))
    # the same computation by hand: the permutation, then each group alone through plain BN
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(moco.encoder_k)
    expected = torch.empty_like(keys)
    with torch.no_grad():
        for g in range(2):
            members = perm[4 * g:4 * g + 4]            # consecutive slices of the shuffled batch
            expected[members] = nn.functional.normalize(ref(x[members]), dim=1)
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-4)
    # with one group the shuffle changes nothing: whole-batch BN is order-free
    whole = moco.key_forward(x, groups=1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(whole, nn.functional.normalize(ref(x), dim=1), atol=1e-5, rtol=1e-4)


def test_enqueue_is_fifo_with_wraparound() -> None:
    model = MoCo("resnet18", dim=2, k=5, small_images=True)
    written: list[float] = []
    expected = model.queue[0].tolist()                   # the random initial keys, overwritten in turn
    for step, b in enumerate([3, 3, 4, 7, 1]):             # K % B != 0, and a batch larger than K
        keys = torch.stack([torch.arange(b, dtype=torch.float) + 10 * step, torch.zeros(b)], dim=1)
        model.enqueue(keys)
        written.extend(keys[:, 0].tolist())
        newest = written[-5:]
        ptr = len(written) % 5
        for i in range(len(written) - b, len(written)):
            expected[i % 5] = written[i]
        assert model.queue[0].tolist() == expected
        assert int(model.queue_ptr) == ptr
        if len(written) >= 5:
            assert sorted(model.queue[0].tolist()) == sorted(newest)


def test_momentum_update_and_copy() -> None:
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=4, k=3, small_images=True)
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    torch.testing.assert_close(model.encoder_k.head[0].weight, model.encoder_q.head[0].weight)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_k = model.encoder_k.backbone.conv1.weight.clone()
    q = model.encoder_q.backbone.conv1.weight.detach().clone()
    model.momentum_update(0.9)
    torch.testing.assert_close(model.encoder_k.backbone.conv1.weight, 0.9 * before_k + 0.1 * q)
    model.copy_query_to_key()
    for pk, pq in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
        assert torch.equal(pk, pq)


def test_channels_last_and_bf16(moco: MoCo) -> None:
    model = copy.deepcopy(moco).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model(x)
        k = model.key_forward(x, groups=2)
    assert torch.isfinite(q.float()).all() and torch.isfinite(k.float()).all()
    model.enqueue(k)
    assert model.queue.dtype == torch.float32


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_width_scales_every_stage_and_the_default_is_torchvisions_network(stem: str) -> None:
    """--width 16: a quarter of the channels in every stage (stem included), every pixel kept; the
    default (64) draws the same initial weights as torchvision's own ResNet-18."""
    narrow = build_backbone("resnet18", stem=stem, width=16)
    assert narrow.conv1.out_channels == 16 and narrow.bn1.num_features == 16
    assert [narrow.layer1[0].conv1.out_channels, narrow.layer2[0].conv1.out_channels,
            narrow.layer3[0].conv1.out_channels, narrow.layer4[0].conv1.out_channels] == [16, 32, 64, 128]
    assert narrow.out_dim == 128 and narrow(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert all(isinstance(m, GroupedBatchNorm2d) for m in narrow.modules() if isinstance(m, nn.BatchNorm2d))
    full = sum(p.numel() for p in build_backbone("resnet18", stem=stem).parameters())
    assert sum(p.numel() for p in narrow.parameters()) < full / 12     # channels^2: about 1/16
    torch.manual_seed(3)
    default = build_backbone("resnet18", stem=stem)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    if stem == "cifar":
        reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(reference.conv1.weight, mode="fan_out", nonlinearity="relu")
    assert torch.equal(default.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(default.conv1.weight, reference.conv1.weight)
    assert build_backbone("resnet50", stem=stem, width=32).out_dim == 1024
    with pytest.raises(ConfigError, match="--width must be >= 1"):
        build_backbone("resnet18", width=0)
    assert MoCo("resnet18", dim=8, k=4, stem=stem, width=16).encoder_k.backbone.out_dim == 128
