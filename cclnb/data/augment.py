"""Image views: the MoCo v2 augmentation on the CPU (torchvision) and batched on any device.

Two implementations of one distribution:

* `moco_v2_transform` & co. are plain torchvision pipelines over PIL images: the authors'
  path, used with DataLoader workers (and by `cclnb bench` as the baseline).
* `BatchMoCoV2Augment` takes a whole uint8 batch already on the device and draws *per-sample*
  random parameters with exactly the sampling rules of torchvision (RandomResizedCrop's ten
  tries and centre-crop fallback, ColorJitter's factors and per-call random order, grayscale,
  blur, flip). For 32 px data this removes the CPU workers from the training loop entirely.

The batched path follows torchvision's *float tensor* semantics (clamping to [0, 1] after every
colour op), not PIL's uint8 rounding; the crop is resized with one bilinear `grid_sample`
without antialiasing (identical to torchvision for upscaling; at 224 px, where a large crop is
downscaled, torchvision/PIL would antialias and we do not; see docs/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from cclnb.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)   # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale

MOCO_CROP_SCALE = (0.2, 1.0)            # MoCo v2: RandomResizedCrop(scale=(0.2, 1.))
LINCLS_CROP_SCALE = (0.08, 1.0)         # torchvision's default, the authors' lincls train crop
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = (0.4, 0.4, 0.4, 0.1)           # brightness, contrast, saturation, hue
JITTER_P, GRAY_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
CROP_TRIES = 10                         # RandomResizedCrop.get_params tries 10 times


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image size must be a positive integer, got {image_size!r}; "
                          f"pass e.g. --image-size 32")


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel of ~10% of the image side (23 at 224 px, 3 at 32 px).

    torchvision's GaussianBlur needs an explicit odd kernel; 10% is the SimCLR/MoCo v2 rule that
    gives the familiar 23 px kernel at 224 px, so the blur scales with the image."""
    _check_size(image_size)
    k = max(3, int(0.1 * image_size))
    return k if k % 2 == 1 else k + 1


def _normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------- CPU (torchvision)
def moco_v2_transform(image_size: int, blur: bool) -> Callable[[Image.Image], Tensor]:
    """MoCo v2's training view (`--aug-plus`) of one PIL image -> normalized (3, S, S) tensor."""
    _check_size(image_size)
    steps: list[Callable] = [
        T.RandomResizedCrop(image_size, scale=MOCO_CROP_SCALE),
        T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
        T.RandomGrayscale(p=GRAY_P),
    ]
    if blur:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), BLUR_SIGMA)], p=BLUR_P))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), _normalize()]
    return T.Compose(steps)


def _resize_then_center(image_size: int) -> list[Callable]:
    """The ImageNet evaluation geometry (resize 256, centre 224) scaled to `image_size`."""
    return [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]


def anchor_geometry(image_size: int, small_images: bool) -> list[Callable]:
    """The anchor view's resize (and crop), for PIL images or image tensors alike."""
    _check_size(image_size)
    return [T.Resize((image_size, image_size))] if small_images else _resize_then_center(image_size)


def anchor_transform(image_size: int, small_images: bool) -> Callable[[Image.Image], Tensor]:
    """CCL's anchor view: un-augmented. Small images are only resized to `image_size` (a no-op
    at native size: centre-cropping a 32 px image to 28 px would throw away 23% of it)."""
    return T.Compose(anchor_geometry(image_size, small_images) + [T.ToTensor(), _normalize()])


def eval_transform(image_size: int, small_images: bool) -> Callable[[Image.Image], Tensor]:
    """Validation / feature-extraction view: the same geometry as the anchor view."""
    return anchor_transform(image_size, small_images)


def lincls_train_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """The authors' linear-probe training view, RandomResizedCrop (scale 0.08-1) + flip, at any
    size. Kept identical at 32 px (rather than CIFAR's pad-and-crop) so that the protocol is one
    operation at every resolution and the study's numbers compare with the authors'."""
    _check_size(image_size)
    return T.Compose([T.RandomResizedCrop(image_size, scale=LINCLS_CROP_SCALE),
                      T.RandomHorizontalFlip(), T.ToTensor(), _normalize()])


# ---------------------------------------------------------------------------- batched (any device)
def to_nchw_uint8(images: Tensor) -> Tensor:
    """Accept (B, H, W, 3) or (B, 3, H, W) uint8 and return a (B, 3, H, W) view.

    The resident dataset is stored HWC (as decoded); models want CHW. A 3-pixel-high image is
    ambiguous and read as CHW."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"expected a uint8 image batch (B, H, W, 3) or (B, 3, H, W), got a {what}; "
                        f"pass the decoded uint8 images (cclnb.data.load_uint8), not normalized floats")
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise DataError(f"image batch of shape {tuple(images.shape)} has no RGB axis of length 3; "
                    f"convert grayscale/RGBA images to RGB first")


def _mean_std(device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize_float(x: Tensor) -> Tensor:
    """(B, 3, H, W) floats in [0, 1] -> ImageNet-normalized (torchvision's Normalize)."""
    mean, std = _mean_std(x.device)
    return (x - mean) / std


def normalize_uint8(images_uint8: Tensor, size: int | None = None) -> Tensor:
    """Anchor / evaluation view of a uint8 batch: optional bilinear resize to `size` (antialiased
    when shrinking, like torchvision's Resize on tensors), then ToTensor + Normalize.

    The result is contiguous NCHW like the augmented views: the (N, H, W, 3) pixels permuted to
    NCHW would otherwise stay channels-last in memory, and a network fed both layouts in one step
    takes slow conversion paths on the CPU (it made CCL's step 1.7x slower per convolution
    backward there)."""
    x = to_nchw_uint8(images_uint8).contiguous().float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        _check_size(size)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < max(x.shape[-2:])).clamp_(0.0, 1.0)
    return normalize_float(x)


def anchor_uint8(images_uint8: Tensor, image_size: int, small_images: bool) -> Tensor:
    """The anchor / evaluation view of a uint8 batch, on its device: the batched twin of
    `anchor_transform`. Small images are resized to `image_size` (a no-op at native size);
    larger ones get the ImageNet geometry, resize to image_size*256/224 then a centre crop,
    with torchvision's `CenterCrop` offset."""
    if small_images:
        return normalize_uint8(images_uint8, image_size)
    resized = round(image_size * 256 / 224)
    top = int(round((resized - image_size) / 2.0))
    return normalize_uint8(images_uint8, resized)[..., top:top + image_size, top:top + image_size]


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device).mul_(high - low).add_(low)


def _fallback_size(height: int | Tensor, width: int | Tensor, ratio: tuple[float, float]
                   ) -> tuple[int | Tensor, int | Tensor]:
    """RandomResizedCrop's centre-crop fallback (w, h) when no try fits: the whole image, cut to
    the nearest allowed aspect ratio. Per sample for (n,) int64 sizes, in the same float64
    arithmetic and round-half-to-even as Python's `round`."""
    if not isinstance(height, Tensor):
        in_ratio = width / height
        if in_ratio < min(ratio):
            return width, int(round(width / min(ratio)))
        if in_ratio > max(ratio):
            return int(round(height * max(ratio))), height
        return width, height
    in_ratio = width.double() / height.double()
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(height.double() * max(ratio)).long(), width)
    fh = torch.where(narrow, torch.round(width.double() / min(ratio)).long(), height)
    return fw, fh


def sample_crop_boxes(n: int, height: int | Tensor, width: int | Tensor, scale: tuple[float, float],
                      ratio: tuple[float, float], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
    """`n` RandomResizedCrop boxes (top, left, h, w) as an (n, 4) int64 tensor.

    Vectorized `RandomResizedCrop.get_params`: ten candidate (area, log-ratio) draws per sample,
    rounded the same way (round half to even, like Python's round), the first that fits is kept,
    and samples where none fits get torchvision's centre-crop fallback. `height` and `width` are
    one image size, or (n,) int64 tensors of every sample's own size (images of different sizes,
    `cclnb.data.jpeg`); the same draws then give each sample the box its own size gives."""
    device = torch.device(device)
    if isinstance(height, Tensor):
        height, width = height.to(device, torch.int64), width.to(device, torch.int64)
        tries_h, tries_w = height.view(n, 1), width.view(n, 1)
    else:
        tries_h, tries_w = height, width
    area = tries_h * tries_w
    target_area = area * _uniform((n, CROP_TRIES), scale[0], scale[1], generator, device)
    log_r = _uniform((n, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    ok = (w > 0) & (w <= tries_w) & (h > 0) & (h <= tries_h)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)          # first valid try (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = ok.any(dim=1)

    fw, fh = _fallback_size(height, width, ratio)
    w = torch.where(found, w, fw if isinstance(fw, Tensor) else torch.full_like(w, fw))
    h = torch.where(found, h, fh if isinstance(fh, Tensor) else torch.full_like(h, fh))
    # randint(0, H - h + 1) drawn as floor(U * (H - h + 1)): uniform over the same integers.
    top = (torch.rand(n, generator=generator, device=device) * (height - h + 1)).long()
    left = (torch.rand(n, generator=generator, device=device) * (width - w + 1)).long()
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def crop_resize_flip(x: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each image to its box, resize to size x size (bilinear) and mirror where `flip`: one
    `grid_sample` for the whole batch. Output pixel u samples the crop at (u + 0.5) * w / size,
    the pixel-centre convention of torchvision's tensor resize (align_corners=False)."""
    b, _, height, width = x.shape
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    top, left, h, w = boxes.unbind(1)
    base = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size      # (S,) in (0, 1)
    mirrored = torch.where(flip.to(x.device).view(b, 1), 1.0 - base.view(1, size), base.view(1, size))
    gx = (left.view(b, 1) + mirrored * w.view(b, 1)) * (2.0 / width) - 1.0          # (B, S)
    gy = (top.view(b, 1) + base.view(1, size) * h.view(b, 1)) * (2.0 / height) - 1.0
    grid = torch.stack([gx.view(b, 1, size).expand(b, size, size),
                        gy.view(b, size, 1).expand(b, size, size)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """torchvision's float `_blend`: factor * a + (1 - factor) * b, clamped to [0, 1]."""
    return (factor * a + (1.0 - factor) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision blends with black: f * x + (1 - f) * 0, which is exactly f * x."""
    return (factor.view(-1, 1, 1, 1) * x).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor.view(-1, 1, 1, 1))


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x), factor.view(-1, 1, 1, 1))


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate hue by `factor` turns per sample: RGB -> HSV (torchvision's formulas), shift,
    HSV -> RGB through the closed form v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6,
    which equals torchvision's six-sector table with fewer kernels."""
    maxc = x.amax(dim=1, keepdim=True)      # amax: no argmax indices, ~20x faster on CPU
    minc = x.amin(dim=1, keepdim=True)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    safe = torch.where(flat, torch.ones_like(delta), delta)
    r, g, b = x.unbind(1)
    r, g, b = r.unsqueeze(1), g.unsqueeze(1), b.unsqueeze(1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + factor.view(-1, 1, 1, 1), 1.0)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return maxc - maxc * s * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, apply: Tensor) -> Tensor:
    """ColorJitter with per-sample factors (B, 4) = (brightness, contrast, saturation, hue) and
    per-sample op order (B, 4) (a permutation of 0..3, torchvision's fn_idx), only where `apply`.

    At stage j each sample runs op order[:, j]. On the CPU each op runs on just the samples it
    applies to (an eighth of the work: a quarter of the ops per stage, 80% of the samples), which
    took about a fifth of a demo step's time when run on all. On a GPU the op runs on the whole
    batch, where the others take that op's identity factor (exact for the three blends) or, for
    hue, keep their input through `where`: selecting the samples would stall on the device's count
    of them 16 times a batch. Both give the same bits on one CPU thread (tests/test_augment.py)."""
    if x.device.type == "cpu":
        return _color_jitter_subsets(x, factors, order, apply)
    return _color_jitter_masked(x, factors, order, apply)


def _color_jitter_masked(x: Tensor, factors: Tensor, order: Tensor, apply: Tensor) -> Tensor:
    """`color_jitter` with every op on the whole batch, masked (the GPU path)."""
    apply = apply.view(-1, 1)
    for stage in range(4):
        active = (order[:, stage:stage + 1] == torch.arange(4, device=x.device)) & apply  # (B, 4)
        for op_id, op in enumerate(_JITTER_OPS):
            mask = active[:, op_id]
            if op_id == 3:
                x = torch.where(mask.view(-1, 1, 1, 1), op(x, factors[:, op_id]), x)
            else:
                identity = torch.full_like(factors[:, op_id], _JITTER_IDENTITY[op_id])
                x = op(x, torch.where(mask, factors[:, op_id], identity))
    return x


def _color_jitter_subsets(x: Tensor, factors: Tensor, order: Tensor, apply: Tensor) -> Tensor:
    """`color_jitter` op by op on the samples it applies to (the CPU path)."""
    for stage in range(4):
        for op_id, op in enumerate(_JITTER_OPS):
            rows = torch.nonzero((order[:, stage] == op_id) & apply).flatten()
            if len(rows):
                x = x.index_copy(0, rows, op(x[rows], factors[rows, op_id]))
    return x


def grayscale(x: Tensor, apply: Tensor) -> Tensor:
    """RandomGrayscale: 3-channel luma where `apply`."""
    return torch.where(apply.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor) -> Tensor:
    """Per-sample Gaussian blur (torchvision's kernel and reflect padding), where `apply`.

    Separable: one depthwise conv per axis with a kernel per (sample, channel), so a batch of
    different sigmas costs two grouped convolutions."""
    b, c, height, width = x.shape
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (pos.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)   # (B*C, k)
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, b * c, height + 2 * pad, width + 2 * pad)
    y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return torch.where(apply.view(-1, 1, 1, 1), y.view(b, c, height, width), x)


@dataclass
class MoCoV2Params:
    """Every random choice of one MoCo v2 batch, one row per sample (inspectable and testable)."""

    boxes: Tensor          # (B, 4) int64 top, left, h, w
    flip: Tensor           # (B,) bool
    jitter: Tensor         # (B,) bool, ColorJitter applied
    factors: Tensor        # (B, 4) brightness, contrast, saturation, hue
    order: Tensor          # (B, 4) int64 permutation of the four jitter ops
    gray: Tensor           # (B,) bool
    blur: Tensor           # (B,) bool
    sigma: Tensor          # (B,) blur sigma

    def to(self, device: torch.device | str) -> "MoCoV2Params":
        return MoCoV2Params(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class BatchMoCoV2Augment(torch.nn.Module):
    """MoCo v2's augmentation for a whole uint8 batch on its own device, per-sample parameters.

    `forward(images, generator)` = `apply(images, sample_params(...))`; call it twice for the
    q and k views. The output is float32 (B, 3, S, S), ImageNet-normalized like the CPU path."""

    def __init__(self, image_size: int, blur: bool, crop_scale: tuple[float, float] = MOCO_CROP_SCALE,
                 jitter: tuple[float, float, float, float] = JITTER, jitter_p: float = JITTER_P,
                 gray_p: float = GRAY_P, blur_p: float = BLUR_P, flip_p: float = FLIP_P) -> None:
        super().__init__()
        _check_size(image_size)
        self.image_size, self.blur = image_size, blur
        self.crop_scale, self.jitter, self.jitter_p = crop_scale, jitter, jitter_p
        self.gray_p, self.blur_p, self.flip_p = gray_p, blur_p, flip_p
        self.kernel_size = blur_kernel_size(image_size)

    def sample_params(self, n: int, height: int | Tensor, width: int | Tensor,
                      generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> MoCoV2Params:
        """Draw the parameters of `n` samples (on the generator's device when one is given); the
        image size is one for all, or (n,) tensors of each sample's own (see `sample_crop_boxes`)."""
        device = generator.device if generator is not None else torch.device(device)
        bri, con, sat, hue = self.jitter
        lows = torch.tensor([1 - bri, 1 - con, 1 - sat, -hue], device=device)
        highs = torch.tensor([1 + bri, 1 + con, 1 + sat, hue], device=device)
        return MoCoV2Params(
            boxes=sample_crop_boxes(n, height, width, self.crop_scale, CROP_RATIO, generator, device),
            jitter=torch.rand(n, generator=generator, device=device) < self.jitter_p,
            factors=lows + (highs - lows) * torch.rand(n, 4, generator=generator, device=device),
            order=torch.rand(n, 4, generator=generator, device=device).argsort(dim=1),
            gray=torch.rand(n, generator=generator, device=device) < self.gray_p,
            blur=(torch.rand(n, generator=generator, device=device) < self.blur_p) & self.blur,
            sigma=_uniform((n,), BLUR_SIGMA[0], BLUR_SIGMA[1], generator, device),
            flip=torch.rand(n, generator=generator, device=device) < self.flip_p,
        )

    def apply(self, images_uint8: Tensor, params: MoCoV2Params) -> Tensor:
        """Run the pipeline with given parameters (torchvision's order: crop, jitter, gray, blur,
        flip; the flip commutes with the colour ops and the symmetric blur, so it is folded
        into the crop's sampling grid)."""
        x = to_nchw_uint8(images_uint8).float().div_(255.0)
        p = params.to(x.device)
        return self.colour(crop_resize_flip(x, p.boxes, p.flip, self.image_size), p)

    def colour(self, x: Tensor, params: MoCoV2Params) -> Tensor:
        """The steps after the crop (jitter, grayscale, blur, normalization) on (B, 3, S, S) views
        in [0, 1], already cropped, resized and flipped (by `apply`, or per image from the full
        resolution by `cclnb.data.jpeg`), with `params` on their device."""
        x = color_jitter(x, params.factors, params.order, params.jitter)
        x = grayscale(x, params.gray)
        if self.blur:
            x = gaussian_blur(x, params.sigma, self.kernel_size, params.blur)
        return normalize_float(x)

    def forward(self, images_uint8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = to_nchw_uint8(images_uint8)
        params = self.sample_params(x.shape[0], x.shape[2], x.shape[3], generator, x.device)
        return self.apply(x, params)


class BatchLinclsAugment(torch.nn.Module):
    """The linear probe's training view (RandomResizedCrop 0.08-1 + flip) for a uint8 batch on
    its device: the batched twin of `lincls_train_transform`."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        _check_size(image_size)
        self.image_size = image_size

    def forward(self, images_uint8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = to_nchw_uint8(images_uint8)
        n, _, height, width = x.shape
        device = generator.device if generator is not None else x.device
        boxes = sample_crop_boxes(n, height, width, LINCLS_CROP_SCALE, CROP_RATIO, generator, device)
        flip = torch.rand(n, generator=generator, device=device) < FLIP_P
        out = crop_resize_flip(x.float().div_(255.0), boxes.to(x.device), flip, self.image_size)
        return normalize_float(out)
