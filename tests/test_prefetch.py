"""`--prefetch`: every batch from its own step's generator (so batches built ahead, or rebuilt by a
resumed epoch, are the same batches), refused where it cannot overlap anything, and on a GPU the
side stream's batches are the main stream's bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cclnb.config import TrainConfig
from cclnb.data.batches import TensorFeeder, epoch_order, step_generator
from cclnb.data.prefetch import PrefetchFeeder, check_prefetch
from cclnb.errors import ConfigError
from cclnb.training.loop import Trainer

N, BATCH = 40, 8


def _feeder(device: str = "cpu") -> tuple[TensorFeeder, tuple[np.ndarray, np.ndarray], np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
    ids = np.arange(N) + 100
    is_old = np.zeros(N, dtype=bool)
    is_old[30:] = True
    feeder = TensorFeeder(images, ids, 16, blur=False, small_images=True, device=torch.device(device))
    return feeder, (ids, is_old), epoch_order(N, 0, 0, 0)


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("q", "k", "anchor", "is_old", "ids"))


def test_a_step_generator_depends_on_the_epoch_seed_and_the_step_only():
    epoch = torch.Generator().manual_seed(1234)
    first = torch.rand(3, generator=step_generator(epoch, 5))
    torch.rand(100, generator=epoch)                          # the key shuffle draws meanwhile
    resumed = torch.Generator().manual_seed(99)
    resumed.set_state(epoch.get_state())                      # what a mid-epoch resume does
    assert torch.equal(torch.rand(3, generator=step_generator(resumed, 5)), first)
    assert not torch.equal(torch.rand(3, generator=step_generator(epoch, 6)), first)
    assert not torch.equal(torch.rand(3, generator=step_generator(torch.Generator().manual_seed(1235), 5)), first)


def test_prefetched_batches_are_their_steps_own_and_a_resume_rebuilds_them():
    feeder, entries, order = _feeder()
    generator = torch.Generator().manual_seed(7)
    prefetch = PrefetchFeeder(feeder, torch.device("cpu"))
    full = list(prefetch.batches(entries, order, BATCH, 0, 1, 0, generator))
    assert len(full) == N // BATCH
    for step, batch in enumerate(full):
        assert _same(batch, feeder.batch_at(entries, order, step, BATCH, 0, 1, step_generator(generator, step)))
    resumed = list(prefetch.batches(entries, order, BATCH, 0, 1, 3, generator))
    assert len(resumed) == 2 and all(_same(a, b) for a, b in zip(resumed, full[3:]))
    # without it, one generator is drawn in step order: another stream (why GPU records differ)
    plain = list(feeder.batches(entries, order, BATCH, 0, 1, 0, torch.Generator().manual_seed(7)))
    assert torch.equal(plain[0].ids, full[0].ids) and not torch.equal(plain[0].q, full[0].q)


def _config(**overrides) -> TrainConfig:
    values = dict(data="demo", arch="resnet18", width=4, epochs=1, batch_size=8, moco_k=16, n_tasks=2,
                  seed=0, progress=False, device="cpu", bn_groups=1, key_bn_groups=1,
                  eval_each_task="none", mlp=True)
    values.update(overrides)
    return TrainConfig(**values)


def test_prefetch_is_refused_on_a_cpu_and_with_the_worker_loader():
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="on a CPU there is nothing to overlap with.*drop --prefetch"):
        Trainer.from_images(_config(prefetch=True), images, np.arange(20) % 2)
    with pytest.raises(ConfigError, match="--loader workers does not.*use --loader tensor"):
        check_prefetch("workers", torch.device("cuda"))
    check_prefetch("decode", torch.device("cuda"))


def test_the_speed_options_are_checked_and_recorded():
    with pytest.raises(ConfigError, match="--compile-mode reduce-overhead is a mode of torch.compile: add --compile"):
        _config(compile_mode="reduce-overhead").validate()
    with pytest.raises(ConfigError, match="--grouped-bn must be one of reshape, strided"):
        _config(grouped_bn="fast").validate()
    with pytest.raises(ConfigError, match="--loader must be one of auto, tensor, workers, decode"):
        _config(loader="dali").validate()
    record = _config(prefetch=True, grouped_bn="strided").to_dict()
    assert record["prefetch"] is True and record["grouped_bn"] == "strided"   # records say which stream


def test_the_trainer_uses_the_strided_batchnorm_everywhere_when_asked():
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    trainer = Trainer.from_images(_config(grouped_bn="strided"), images, np.arange(20) % 2)
    from cclnb.training.models import GroupedBatchNorm2d

    for encoder in (trainer.model.encoder_q, trainer.model.encoder_k):
        layers = [m for m in encoder.modules() if isinstance(m, GroupedBatchNorm2d)]
        assert layers and all(m.strided for m in layers)
    default = Trainer.from_images(dataclasses.replace(_config(), grouped_bn="reshape"), images, np.arange(20) % 2)
    assert not any(m.strided for m in default.model.modules() if isinstance(m, GroupedBatchNorm2d))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_stream_batches_equal_the_main_streams_bit_for_bit():
    feeder, entries, order = _feeder("cuda")
    generator = torch.Generator(device="cuda").manual_seed(7)
    prefetch = PrefetchFeeder(feeder, torch.device("cuda"), channels_last=True)
    got = []
    for batch in prefetch.batches(entries, order, BATCH, 0, 1, 0, generator):
        got.append(batch)
        torch.cuda._sleep(2_000_000)            # a long "step" on the main stream meanwhile
    torch.cuda.synchronize()
    for step, batch in enumerate(got):
        want = feeder.batch_at(entries, order, step, BATCH, 0, 1, step_generator(generator, step))
        assert _same(batch, want) and batch.q.is_contiguous(memory_format=torch.channels_last)
    resumed = torch.Generator(device="cuda").manual_seed(0)
    resumed.set_state(generator.get_state())
    tail = list(prefetch.batches(entries, order, BATCH, 0, 1, 2, resumed))
    assert all(_same(a, b) for a, b in zip(tail, got[2:]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_prefetching_strided_trainer_trains_an_epoch_on_the_gpu():
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    config = _config(device="cuda", prefetch=True, grouped_bn="strided", batch_size=16, bn_groups=4,
                     key_bn_groups=4, precision="bf16", width=8)
    trainer = Trainer.from_images(config, images, np.arange(64) % 2)
    trainer.start_task(0)
    results = trainer.run_epoch()
    assert len(results) == 2 and all(torch.isfinite(r.losses["total"]) for r in results)
