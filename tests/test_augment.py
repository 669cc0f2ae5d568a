"""The batched MoCo v2 augmentation against torchvision: parameter distributions (fixed seeds,
thousands of draws, KS / chi-square tolerances) and each operation against torchvision's
functional op on the same pixels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from cclnb.data.augment import (_color_jitter_masked, CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, LINCLS_CROP_SCALE, MOCO_CROP_SCALE,
                                BatchLinclsAugment, BatchMoCoV2Augment, MoCoV2Params, adjust_brightness,
                                adjust_contrast, adjust_hue, adjust_saturation, anchor_transform,
                                blur_kernel_size, color_jitter, crop_resize_flip, gaussian_blur, grayscale,
                                moco_v2_transform, normalize_uint8, sample_crop_boxes)
from cclnb.errors import ConfigError, DataError

N_DRAWS = 4000


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random uint8 images (B, H, W, 3): noise plus gradients, so crops differ."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size).view(1, size, 1, 1)
    noise = torch.randint(0, 56, (n, size, size, 3), generator=g)
    return (noise + ramp + ramp.transpose(1, 2) * 0.25).clamp(0, 255).to(torch.uint8)


def _float01(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _identity_params(n: int, size: int) -> MoCoV2Params:
    return MoCoV2Params(
        boxes=torch.tensor([[0, 0, size, size]] * n), flip=torch.zeros(n, dtype=torch.bool),
        jitter=torch.zeros(n, dtype=torch.bool), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n),
        order=torch.arange(4).repeat(n, 1), gray=torch.zeros(n, dtype=torch.bool),
        blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n))


def _torchvision_boxes(height: int, width: int, scale: tuple[float, float], n: int) -> np.ndarray:
    torch.manual_seed(1)
    img = torch.zeros(3, height, width)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(CROP_RATIO)) for _ in range(n)])


@pytest.mark.parametrize("height,width,scale", [(32, 32, MOCO_CROP_SCALE), (32, 32, LINCLS_CROP_SCALE),
                                                (24, 40, MOCO_CROP_SCALE)])
def test_crop_boxes_match_torchvision_in_distribution(height, width, scale):
    ours = sample_crop_boxes(N_DRAWS, height, width, scale, CROP_RATIO,
                             torch.Generator().manual_seed(0)).numpy()
    ref = _torchvision_boxes(height, width, scale, N_DRAWS)
    assert (ours[:, 2] >= 1).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 3] >= 1).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)          # noqa: E731
    log_ratio = lambda b: np.log(b[:, 3] / b[:, 2])                  # noqa: E731
    centre_y = lambda b: b[:, 0] + b[:, 2] / 2                       # noqa: E731
    centre_x = lambda b: b[:, 1] + b[:, 3] / 2                       # noqa: E731
    for stat in (area, log_ratio, centre_y, centre_x):
        ks = stats.ks_2samp(stat(ours), stat(ref))
        assert ks.statistic < 0.05, (stat, ks)
        assert abs(np.median(stat(ours)) - np.median(stat(ref))) < 0.05 * (np.ptp(stat(ref)) + 1e-9)


def test_crop_fallback_is_torchvisions_centre_crop():
    # scale > 1 never fits: every sample takes the fallback; a 10x40 image is wider than 4:3.
    for height, width in [(32, 32), (10, 40), (40, 10)]:
        ours = sample_crop_boxes(5, height, width, (2.0, 3.0), CROP_RATIO)
        ref = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [2.0, 3.0], list(CROP_RATIO))
        assert (ours == torch.tensor(ref)).all(), (height, width, ours[0], ref)


def test_jitter_factors_order_and_rates():
    aug = BatchMoCoV2Augment(32, blur=True)
    n = 24 * 1000
    p = aug.sample_params(n, 32, 32, torch.Generator().manual_seed(3))
    lows, highs = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert ((p.factors >= lows) & (p.factors <= highs)).all()
    for col in range(4):   # uniform on its range: KS against U[low, high]
        ks = stats.kstest(p.factors[:, col].numpy(), "uniform", args=(lows[col].item(), (highs - lows)[col].item()))
        assert ks.pvalue > 1e-3, (col, ks)
    # the op order is a uniformly random permutation (chi-square over the 24 permutations)
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    index = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([index[tuple(r)] for r in p.order.tolist()], minlength=24)
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    for flag, rate in [(p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.5), (p.flip, 0.5)]:
        assert abs(flag.float().mean().item() - rate) < 0.015
    assert ((p.sigma >= 0.1) & (p.sigma <= 2.0)).all()
    no_blur = BatchMoCoV2Augment(32, blur=False).sample_params(1000, 32, 32)
    assert not no_blur.blur.any()


def test_identity_parameters_equal_totensor_normalize():
    images = _images(4)
    out = BatchMoCoV2Augment(32, blur=True).apply(images, _identity_params(4, 32))
    ref = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(im.numpy())), IMAGENET_MEAN, IMAGENET_STD)
                       for im in images])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize_uint8(images), ref, atol=1e-6, rtol=0)
    cpu_anchor = anchor_transform(32, small_images=True)
    torch.testing.assert_close(cpu_anchor(Image.fromarray(images[0].numpy())), ref[0], atol=1e-6, rtol=0)


def test_each_colour_op_equals_torchvisions():
    x = _float01(3)
    f = torch.tensor([0.6, 1.0, 1.4])
    h = torch.tensor([-0.1, 0.03, 0.1])
    for ours, theirs, factors in [(adjust_brightness, TF.adjust_brightness, f),
                                  (adjust_contrast, TF.adjust_contrast, f),
                                  (adjust_saturation, TF.adjust_saturation, f),
                                  (adjust_hue, TF.adjust_hue, h)]:
        got = ours(x, factors)
        for i in range(3):
            torch.testing.assert_close(got[i], theirs(x[i], factors[i].item()), atol=2e-5, rtol=0)
    gray = grayscale(x, torch.tensor([True, False, True]))
    torch.testing.assert_close(gray[0], TF.rgb_to_grayscale(x[0], 3))
    torch.testing.assert_close(gray[1], x[1])


def test_per_sample_jitter_order_equals_sequential_torchvision():
    x = _float01(3, seed=5)
    factors = torch.tensor([[1.3, 0.7, 1.4, 0.08], [0.6, 1.35, 0.65, -0.09], [1.1, 1.2, 0.8, 0.05]])
    order = torch.tensor([[3, 0, 2, 1], [1, 2, 3, 0], [0, 1, 2, 3]])
    apply = torch.tensor([True, True, False])
    got = color_jitter(x, factors, order, apply)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(2):
        ref = x[i]
        for op_id in order[i].tolist():
            ref = ops[op_id](ref, factors[i, op_id].item())
        torch.testing.assert_close(got[i], ref, atol=3e-5, rtol=0)
    torch.testing.assert_close(got[2], x[2])


def test_the_cpu_jitter_on_subsets_equals_the_masked_batch_bit_for_bit():
    """The CPU path runs each colour op on the samples it applies to, the GPU path on the whole
    batch with identity factors elsewhere: on one thread the two give the same bits, so the
    faster path changed no run's numbers."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, 32, 32, generator=gen)
    factors = torch.stack([0.6 + 0.8 * torch.rand(64, generator=gen), 0.6 + 0.8 * torch.rand(64, generator=gen),
                           0.6 + 0.8 * torch.rand(64, generator=gen), 0.2 * torch.rand(64, generator=gen) - 0.1], 1)
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(64)])
    apply = torch.rand(64, generator=gen) < 0.8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        subsets = color_jitter(x, factors, order, apply)          # x on the CPU: the subset path
        masked = _color_jitter_masked(x, factors, order, apply)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(subsets, masked) and not torch.equal(subsets, x)
    assert torch.equal(subsets[~apply], x[~apply])


def test_per_sample_blur_equals_torchvision():
    x = _float01(3, seed=7)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    k = blur_kernel_size(32)
    got = gaussian_blur(x, sigma, k, torch.tensor([True, True, False]))
    for i in range(2):
        torch.testing.assert_close(got[i], TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2], x[2])
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3


def test_crop_resize_flip_matches_slicing_and_interpolate():
    x = _images(2, size=48).permute(0, 3, 1, 2).float() / 255
    boxes = torch.tensor([[5, 7, 32, 32], [0, 3, 32, 32]])
    out = crop_resize_flip(x, boxes, torch.tensor([False, True]), 32)
    torch.testing.assert_close(out[0], x[0, :, 5:37, 7:39], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1, :, 0:32, 3:35].flip(-1), atol=1e-5, rtol=0)
    # an upscaled crop equals torchvision's bilinear resize away from the crop border, where
    # we read the real neighbours instead of replicating the crop's edge pixels.
    boxes = torch.tensor([[4, 6, 12, 20], [10, 10, 30, 16]])
    out = crop_resize_flip(x, boxes, torch.tensor([False, False]), 32)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(x[i], top, left, h, w, [32, 32], antialias=False)
        torch.testing.assert_close(out[i, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-5, rtol=0)


def test_batch_output_finite_random_per_sample_and_reproducible():
    images = _images(64)
    aug = BatchMoCoV2Augment(32, blur=True)
    a = aug(images, torch.Generator().manual_seed(0))
    b = aug(images, torch.Generator().manual_seed(0))
    c = aug(images, torch.Generator().manual_seed(1))
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (a >= low.view(1, 3, 1, 1) - 1e-5).all() and (a <= high.view(1, 3, 1, 1) + 1e-5).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    same = images[:1].expand(8, -1, -1, -1).contiguous()       # one image, eight views
    views = aug(same, torch.Generator().manual_seed(2))
    assert all(not torch.allclose(views[0], views[i]) for i in range(1, 8))
    p = aug.sample_params(2, 32, 32, torch.Generator().manual_seed(4))
    assert not torch.equal(p.factors[0], p.factors[1]) and p.sigma[0] != p.sigma[1]
    chw = aug(images.permute(0, 3, 1, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(chw, a)


def test_output_statistics_match_the_cpu_pipeline():
    """Same images through torchvision's PIL pipeline and the batched one: per-channel means and
    standard deviations of the views agree (the PIL path rounds to uint8, hence the tolerance)."""
    images = _images(1024, seed=9)   # per-image brightness spread: 4 standard errors = 0.08
    cpu = moco_v2_transform(32, blur=True)
    torch.manual_seed(0)
    ref = torch.stack([cpu(Image.fromarray(im.numpy())) for im in images])
    ours = BatchMoCoV2Augment(32, blur=True)(images, torch.Generator().manual_seed(0))
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours.mean(dim=(0, 2, 3)), ref.mean(dim=(0, 2, 3)), atol=0.08, rtol=0)
    torch.testing.assert_close(ours.std(dim=(0, 2, 3)), ref.std(dim=(0, 2, 3)), atol=0.08, rtol=0)


def test_lincls_and_normalize_views():
    images = _images(16)
    out = BatchLinclsAugment(32)(images, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and torch.isfinite(out).all()
    assert normalize_uint8(images, size=24).shape == (16, 3, 24, 24)
    big = anchor_transform(224, small_images=False)(Image.new("RGB", (300, 260)))
    assert big.shape == (3, 224, 224)


def test_bad_inputs_raise_clear_errors():
    aug = BatchMoCoV2Augment(32, blur=False)
    with pytest.raises(DataError, match="uint8"):
        aug(torch.rand(2, 3, 32, 32))
    with pytest.raises(DataError, match="RGB"):
        aug(torch.zeros(2, 32, 32, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="image size"):
        BatchMoCoV2Augment(0, blur=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the batched path's real home)")
def test_cuda_equals_cpu_for_the_same_parameters():
    images = _images(32)
    aug = BatchMoCoV2Augment(32, blur=True)
    params = aug.sample_params(32, 32, 32, torch.Generator().manual_seed(0))
    cpu = aug.apply(images, params)
    gpu = aug.apply(images.cuda(), params.to("cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    assert aug(images.cuda(), generator).device.type == "cuda"


def test_anchor_uint8_matches_the_anchor_transform_geometry():
    """The batched anchor view equals torchvision's Resize(S*256/224) + CenterCrop(S) +
    Normalize on the same tensor (large protocol) and a plain resize (small protocol)."""
    import torchvision.transforms as T

    from cclnb.data.augment import IMAGENET_MEAN, IMAGENET_STD, anchor_uint8

    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=gen)
    x = images.permute(0, 3, 1, 2).float() / 255
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    large = T.Compose([T.Resize(round(96 * 256 / 224), antialias=True), T.CenterCrop(96), normalize])
    got = anchor_uint8(images, 96, small_images=False)
    assert got.shape == (4, 3, 96, 96)
    torch.testing.assert_close(got, large(x), atol=1e-4, rtol=0)
    small = T.Compose([T.Resize((16, 16), antialias=True), normalize])
    torch.testing.assert_close(anchor_uint8(images, 16, small_images=True), small(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(anchor_uint8(images, 32, small_images=True), normalize(x), atol=1e-5, rtol=0)
