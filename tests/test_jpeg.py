"""`--loader decode` on the CPU (the same code path as on a GPU, with libjpeg): per-sample crop
boxes of images of different sizes against torchvision's RandomResizedCrop, views cut from the
decoded full-resolution image, exact resume, and the errors a user can meet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from cclnb.config import TrainConfig
from cclnb.data import open_dataset
from cclnb.data.augment import (CROP_RATIO, LINCLS_CROP_SCALE, MOCO_CROP_SCALE, MoCoV2Params, anchor_transform,
                                normalize_float, sample_crop_boxes)
from cclnb.data.batches import epoch_order, step_generator
from cclnb.data.jpeg import DecodeFeeder, decode_images
from cclnb.data.prefetch import PrefetchFeeder
from cclnb.errors import DataError
from cclnb.training.loop import Trainer
from cclnb.training.plan import plan_tasks

SIZES = [(32, 32), (375, 500), (500, 333), (64, 48)]     # (height, width), interleaved per sample
N_EACH = 3000
CPU = torch.device("cpu")


def _torchvision_boxes(height: int, width: int, scale: tuple[float, float], n: int) -> np.ndarray:
    torch.manual_seed(1)
    img = torch.zeros(1, height, width)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(CROP_RATIO)) for _ in range(n)])


@pytest.mark.parametrize("scale", [MOCO_CROP_SCALE, LINCLS_CROP_SCALE])
def test_per_sample_sizes_give_each_image_torchvisions_crop_distribution(scale):
    heights = torch.tensor([h for _ in range(N_EACH) for h, _ in SIZES])
    widths = torch.tensor([w for _ in range(N_EACH) for _, w in SIZES])
    boxes = sample_crop_boxes(len(heights), heights, widths, scale, CROP_RATIO,
                              torch.Generator().manual_seed(0)).numpy()
    for k, (height, width) in enumerate(SIZES):
        ours, ref = boxes[k::len(SIZES)], _torchvision_boxes(height, width, scale, N_EACH)
        assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
        assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
        for name, stat in (("area", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                           ("log ratio", lambda b: np.log(b[:, 3] / b[:, 2])),
                           ("centre y", lambda b: (b[:, 0] + b[:, 2] / 2) / height),
                           ("centre x", lambda b: (b[:, 1] + b[:, 3] / 2) / width)):
            ks = stats.ks_2samp(stat(ours), stat(ref))
            assert ks.statistic < 0.05, (height, width, name, ks)


def test_per_sample_sizes_equal_the_one_size_path_and_its_fallback():
    for height, width, scale in [(32, 32, MOCO_CROP_SCALE), (24, 40, LINCLS_CROP_SCALE), (10, 40, (2.0, 3.0))]:
        one = sample_crop_boxes(200, height, width, scale, CROP_RATIO, torch.Generator().manual_seed(3))
        each = sample_crop_boxes(200, torch.full((200,), height), torch.full((200,), width), scale, CROP_RATIO,
                                 torch.Generator().manual_seed(3))
        assert torch.equal(one, each)
    # scale > 1 never fits: every sample takes torchvision's fallback for its own size
    heights, widths = torch.tensor([32, 10, 40, 300]), torch.tensor([32, 40, 10, 200])
    boxes = sample_crop_boxes(4, heights, widths, (2.0, 3.0), CROP_RATIO)
    for box, height, width in zip(boxes.tolist(), heights.tolist(), widths.tolist()):
        assert box == list(T.RandomResizedCrop.get_params(torch.zeros(1, height, width), [2.0, 3.0], list(CROP_RATIO)))


def _jpeg_folder(root: Path, sizes=((40, 40), (60, 45), (36, 90), (120, 100)), n_classes: int = 2,
                 png: bool = False) -> Path:
    rng = np.random.RandomState(0)
    for k in range(n_classes):
        folder = root / "train" / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            ramp = np.linspace(0, 180, w, dtype=np.float32)[None, :, None]
            pixels = (rng.randint(0, 60, (h, w, 3)) + ramp).astype(np.uint8)
            # 4:4:4: no chroma upsampling, where nvJPEG and libjpeg may differ by more than rounding
            Image.fromarray(pixels).save(folder / f"img_{i}.jpg", quality=95, subsampling=0)
        if png:
            Image.fromarray(rng.randint(0, 256, (30, 50, 3), dtype=np.uint8)).save(folder / "img_9.png")
    return root


def test_decoded_pixels_and_views_come_from_the_full_resolution_image(tmp_path):
    ds = open_dataset(str(_jpeg_folder(tmp_path, png=True)), "train")
    images = decode_images([ds.read_bytes(i) for i in range(len(ds))], CPU, ds.describe)
    for i, image in enumerate(images):
        pil = torch.from_numpy(np.array(ds.load_pil(i))).permute(2, 0, 1)
        assert image.shape == pil.shape and image.dtype == torch.uint8
        assert (image.int() - pil.int()).abs().max() <= 2           # libjpeg here and in PIL
    feeder = DecodeFeeder(ds, 24, blur=False, small_images=True, device=CPU)
    n = 3
    params = MoCoV2Params(boxes=torch.tensor([[5, 7, 20, 30], [0, 0, 60, 45], [10, 20, 26, 50]]),
                          flip=torch.tensor([False, True, False]), jitter=torch.zeros(n, dtype=torch.bool),
                          factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n), order=torch.arange(4).repeat(n, 1),
                          gray=torch.zeros(n, dtype=torch.bool), blur=torch.zeros(n, dtype=torch.bool),
                          sigma=torch.ones(n))
    views = feeder._moco_view(images[:3], params)
    for view, image, (top, left, h, w), flip in zip(views, images, params.boxes.tolist(), params.flip):
        want = TF.resized_crop(image.float() / 255, top, left, h, w, [24, 24], antialias=True)   # torchvision's own
        want = normalize_float((want.flip(-1) if flip else want)[None])[0]
        torch.testing.assert_close(view, want, atol=1e-5, rtol=0)
    anchors = feeder._anchor(images)
    pil_anchor = torch.stack([anchor_transform(24, True)(ds.load_pil(i)) for i in range(len(ds))])
    assert anchors.shape == pil_anchor.shape == (len(ds), 3, 24, 24)
    assert (anchors - pil_anchor).abs().mean() < 0.05       # PIL resizes in uint8, the tensor path in float


def test_batches_are_seeded_per_step_so_a_resume_rebuilds_them(tmp_path):
    ds = open_dataset(str(_jpeg_folder(tmp_path)), "train")
    entries = (np.arange(len(ds)), np.arange(len(ds)) >= 6)
    order = epoch_order(len(ds), 0, 0, 0)
    generator = torch.Generator().manual_seed(11)
    feeder = DecodeFeeder(ds, 32, blur=True, small_images=False, device=CPU)
    full = list(feeder.batches(entries, order, 2, 0, 1, 0, generator))
    assert len(full) == 4 and full[0].q.shape == full[0].anchor.shape == (2, 3, 32, 32)
    resumed = list(feeder.batches(entries, order, 2, 0, 1, 2, generator))
    wrapped = list(PrefetchFeeder(DecodeFeeder(ds, 32, True, False, CPU), CPU).batches(entries, order, 2, 0, 1, 0,
                                                                                        generator))
    for got, want in [*zip(resumed, full[2:]), *zip(wrapped, full)]:
        for field in ("q", "k", "anchor", "is_old"):
            assert torch.equal(getattr(got, field), getattr(want, field))
    assert not torch.equal(full[0].q, full[0].k)
    one = feeder.batch_at(entries, order, 1, 2, 0, 1, step_generator(generator, 1, CPU))
    assert torch.equal(one.q, full[1].q)


def test_the_decode_loader_trains_through_the_trainer(tmp_path):
    ds = open_dataset(str(_jpeg_folder(tmp_path)), "train")
    config = TrainConfig(data=str(tmp_path), arch="resnet18", width=4, epochs=1, batch_size=4, moco_k=8,
                         n_tasks=2, seed=0, progress=False, device="cpu", bn_groups=1, key_bn_groups=1,
                         eval_each_task="none", mlp=True, loader="decode", image_size=32, precision="fp32")
    plan = plan_tasks(config, ds.targets, len(ds.classes))
    from cclnb.training import dist

    ctx = dist.DistContext(rank=0, world_size=1, local_rank=0, device=CPU)
    trainer = Trainer(config, ds, plan, ctx)
    assert isinstance(trainer.feeder, DecodeFeeder)
    trainer.start_task(0)
    results = trainer.run_epoch()
    assert len(results) == 1 and torch.isfinite(results[0].losses["total"])


def test_clear_errors_for_arrays_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="demo.*holds decoded pixels, not files; use --loader tensor"):
        DecodeFeeder(open_dataset("demo", "train"), 32, False, True, CPU)
    ds = open_dataset(str(_jpeg_folder(tmp_path)), "train")
    encoded = [ds.read_bytes(0), b"\xff\xd8" + bytes(range(256)) * 4, ds.read_bytes(1)]   # a JPEG marker, then noise
    with pytest.raises(DataError, match=r"cannot decode image train/class_0/bad\.jpg.*replace it or delete it"):
        decode_images(encoded, CPU, lambda i: "train/class_0/bad.jpg" if i == 1 else ds.describe(i))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_nvjpeg_views_equal_the_cpu_decoders_closely(tmp_path):
    ds = open_dataset(str(_jpeg_folder(tmp_path, png=True)), "train")
    entries = (np.arange(len(ds)), np.zeros(len(ds), dtype=bool))
    order = epoch_order(len(ds), 0, 0, 0)
    cuda = torch.device("cuda")
    prefetch = PrefetchFeeder(DecodeFeeder(ds, 32, True, False, cuda), cuda, channels_last=True)
    gpu = next(prefetch.batches(entries, order, 10, 0, 1, 0, torch.Generator(device="cuda").manual_seed(3)))
    want = DecodeFeeder(ds, 32, True, False, CPU).batch_at(entries, order, 0, 10, 0, 1,
                                                           step_generator(torch.Generator().manual_seed(3), 0, CPU))
    for field in ("q", "k", "anchor"):             # the same crops: parameters are drawn on the host
        assert (getattr(gpu, field).cpu() - getattr(want, field)).abs().mean() < 0.05, field   # ~3 levels
