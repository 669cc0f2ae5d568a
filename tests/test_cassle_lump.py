"""CaSSLe and LUMP: their pure pieces against hand computations, then both methods inside the real
trainer (weights that must change do, frozen ones do not, and a resume is exact)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cclnb.errors import ConfigError
from cclnb.training.losses import contrastive_distillation
from cclnb.training.methods.lump import matched_buffer_size, mixup, reservoir_update


# ----------------------------------------------------------------------------- CaSSLe's loss
def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _distill_by_hand(p1, p2, z1, z2, t: float) -> float:
    """The reference's two simclr_distill_loss_func calls, written out: S[i][j] = <P_i, Z_j> / t
    over the 2b predictions P and 2b frozen projections Z, the positive of row i is column i;
    cross-entropy over rows, then over columns, averaged."""
    P = [_unit(v) for v in p1 + p2]
    Z = [_unit(v) for v in z1 + z2]
    n = len(P)
    S = [[sum(a * b for a, b in zip(P[i], Z[j])) / t for j in range(n)] for i in range(n)]
    rows = sum(-S[i][i] + math.log(sum(math.exp(S[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-S[j][j] + math.log(sum(math.exp(S[i][j]) for i in range(n))) for j in range(n)) / n
    return (rows + cols) / 2


P1 = [[2.0, 0.0, 1.0], [0.0, 1.0, -1.0]]
P2 = [[1.0, 1.0, 0.0], [0.0, -3.0, 0.5]]
Z1 = [[1.0, 0.0, 0.0], [3.0, 4.0, 0.0]]
Z2 = [[0.0, 2.0, 2.0], [-1.0, 0.0, 0.3]]


@pytest.mark.parametrize("t", [0.2, 0.5])
def test_contrastive_distillation_by_hand_in_float64(t: float) -> None:
    tensors = [torch.tensor(x, dtype=torch.float64) for x in (P1, P2, Z1, Z2)]
    loss = contrastive_distillation(*tensors, t=t)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_distill_by_hand(P1, P2, Z1, Z2, t), rel=1e-12)


def test_contrastive_distillation_counts_the_other_view_as_a_negative() -> None:
    """The positive is the frozen projection of the same view: aligning a prediction with the
    image's other view (and not its own) makes the loss larger, not smaller."""
    z = torch.eye(4, dtype=torch.float64)
    z1, z2 = z[:2], z[2:]
    own = contrastive_distillation(z1.clone(), z2.clone(), z1, z2, t=0.2)
    swapped = contrastive_distillation(z2.clone(), z1.clone(), z1, z2, t=0.2)
    assert own.item() < swapped.item()


def test_contrastive_distillation_grads_reach_predictions_only_and_fp32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 8, generator=g) for _ in range(4))
    p1.requires_grad_(True)
    z1.requires_grad_(True)
    exact = contrastive_distillation(p1, p2, z1, z2)
    exact.backward()
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and z1.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = contrastive_distillation(p1.bfloat16(), p2.bfloat16(), z1.bfloat16(), z2.bfloat16())
    assert under.dtype == torch.float32


# ----------------------------------------------------------------------------- LUMP's pieces
def test_reservoir_fills_in_order_then_keeps_its_capacity() -> None:
    rng = np.random.default_rng(0)
    empty = np.full(5, -1, dtype=np.int64)
    buffer, seen = reservoir_update(empty, 0, np.array([10, 11, 12]), rng)
    assert buffer.tolist() == [10, 11, 12, -1, -1] and seen == 3
    assert empty.tolist() == [-1] * 5                        # the input is not modified
    buffer, seen = reservoir_update(buffer, seen, np.arange(100, 140), rng)
    assert len(buffer) == 5 and seen == 43 and (buffer >= 0).all()
    assert len(set(buffer.tolist())) == 5                    # distinct ids stay distinct


def test_reservoir_keeps_every_id_with_probability_capacity_over_stream() -> None:
    """Over 400 seeded streams of 1,000 ids fed in batches of 64, each id ends in a 100-slot buffer
    with probability 0.1, early ids as often as late ones (per block of 100 ids the frequency has
    a standard deviation of 0.0015; the tolerance is 8 of those)."""
    n, capacity, trials = 1000, 100, 400
    kept = np.zeros(n)
    for trial in range(trials):
        rng = np.random.default_rng([7, trial])
        buffer, seen = np.full(capacity, -1, dtype=np.int64), 0
        for start in range(0, n, 64):
            buffer, seen = reservoir_update(buffer, seen, np.arange(start, min(start + 64, n)), rng)
        assert seen == n and len(np.unique(buffer)) == capacity
        kept[buffer] += 1
    blocks = kept.reshape(10, 100).mean(axis=1) / trials
    assert np.abs(blocks - capacity / n).max() < 0.012, blocks


def test_reservoir_does_not_depend_on_how_the_stream_is_cut() -> None:
    stream = np.arange(500)
    whole, _ = reservoir_update(np.full(20, -1), 0, stream, np.random.default_rng(3))
    rng, buffer, seen = np.random.default_rng(3), np.full(20, -1), 0
    for part in np.array_split(stream, 7):
        buffer, seen = reservoir_update(buffer, seen, part, rng)
    assert buffer.tolist() == whole.tolist()


def test_mixup_by_hand() -> None:
    x = torch.tensor([[1.0, 3.0], [0.0, -2.0]])
    y = torch.tensor([[5.0, -1.0], [4.0, 2.0]])
    assert mixup(x, y, 0.25).tolist() == [[4.0, 0.0], [3.0, 1.0]]     # 0.25 x + 0.75 y
    assert mixup(x, y, 1.0).tolist() == x.tolist()


def test_matched_buffer_size_is_the_most_replay_ever_holds() -> None:
    assert matched_buffer_size(10, 200) == 1800      # tin100-32-cpu-w16: 9 earlier tasks x 20 x 10
    assert matched_buffer_size(1, 200) == 200


def test_options_refuse_bad_values() -> None:
    from cclnb.training.methods.cassle import CaSSLeOptions
    from cclnb.training.methods.lump import LUMPOptions

    with pytest.raises(ConfigError, match="--cassle-t must be > 0"):
        CaSSLeOptions(cassle_t=0.0)
    with pytest.raises(ConfigError, match="--cassle-pred-hidden"):
        CaSSLeOptions(cassle_pred_hidden=0)
    with pytest.raises(ConfigError, match="--lump-alpha"):
        LUMPOptions(lump_alpha=-1.0)
    with pytest.raises(ConfigError, match="--lump-buffer-size"):
        LUMPOptions(lump_buffer_size=0)


# ----------------------------------------------------------------------------- inside the trainer
N_CLASSES, PER_CLASS = 4, 12      # 2 tasks of 24 images: 3 steps of 8 per epoch, 2 epochs per task


def _images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N_CLASSES * PER_CLASS, 32, 32, 3), dtype=np.uint8)
    return images, np.repeat(np.arange(N_CLASSES), PER_CLASS)


def _trainer(method: str, run_dir=None, **options):
    from cclnb.config import TrainConfig
    from cclnb.training import Trainer

    config = TrainConfig(method=method, arch="resnet18", stem="cifar", width=8, batch_size=8, moco_k=16,
                         moco_dim=16, n_tasks=2, n_save=2, epochs=2, seed=0, progress=False,
                         eval_each_task="none", device="cpu", bn_groups=2, key_bn_groups=2,
                         precision="fp32", print_freq=1).with_options(**options)
    return Trainer.from_images(config, *_images(), run_dir=run_dir)


def _record_losses(trainer) -> list[dict[str, float]]:
    """Every step's losses, in order."""
    seen: list[dict[str, float]] = []
    original = trainer.train_step

    def train_step(batch, generator=None):
        result = original(batch, generator)
        seen.append({name: float(value) for name, value in result.losses.items()})
        return result

    trainer.train_step = train_step
    return seen


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_cassle_trains_its_predictor_from_the_second_task_against_a_frozen_copy(one_thread) -> None:
    trainer = _trainer("CaSSLe", cassle_pred_hidden=32)
    method = trainer.method
    assert trainer.loss_names == ("total", "moco", "cassle")
    assert any(p is next(method.predictor.parameters()) for g in trainer.optimizer.param_groups
               for p in g["params"])                       # the trainer's SGD steps the predictor
    losses = _record_losses(trainer)
    predictor_start = _state(method.predictor)
    trainer.start_task(0)
    for _ in range(2):
        trainer.run_epoch()
    trainer.finish_task()
    assert method.frozen is None and all(step["cassle"] == 0 for step in losses)
    _assert_equal_states(predictor_start, _state(method.predictor))     # no distillation, no step

    trainer.start_task(1)
    student_at_start = _state(trainer.model.encoder_q)
    _assert_equal_states(student_at_start, _state(method.frozen))       # the copy: weights and stats
    assert not any(p.requires_grad for p in method.frozen.parameters())
    for _ in range(2):
        trainer.run_epoch()
    assert all(step["cassle"] > 0 for step in losses[6:])
    _assert_equal_states(student_at_start, _state(method.frozen))       # frozen all task long
    changed = [name for name, value in _state(method.predictor).items()
               if name.endswith("weight") and not torch.equal(value, predictor_start[name])]
    assert len(changed) == 3, changed                   # both linears and the BatchNorm's scale
    assert not torch.equal(student_at_start["backbone.conv1.weight"],
                           trainer.model.encoder_q.state_dict()["backbone.conv1.weight"])


def _interrupted_then_resumed(tmp_path, method: str, stop_at: int, **options):
    """(losses of an uninterrupted run, its final trainer, losses after the resume, the resumed
    trainer): a run stopped by SIGTERM after step `stop_at`, resumed from its checkpoint in a new
    trainer."""
    import os
    import signal

    from cclnb.errors import Interrupted
    from cclnb.training.checkpoint import load_checkpoint

    reference = _trainer(method, **options)
    reference_losses = _record_losses(reference)
    reference.run()

    cut = _trainer(method, run_dir=tmp_path / "cut", **options)
    steps = {"n": 0}
    original = cut.method.after_step

    def after_step(batch, keys_all, is_old_all):
        original(batch, keys_all, is_old_all)
        steps["n"] += 1
        if steps["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)     # the step finishes, then the loop saves and stops

    cut.method.after_step = after_step
    with pytest.raises(Interrupted):
        cut.run()
    resumed = _trainer(method, **options)
    resumed.load(load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt"))
    assert (resumed.task, resumed.epoch, resumed.step) == (1, 0, stop_at - 6)    # mid task 1, mid epoch
    resumed_losses = _record_losses(resumed)
    resumed.run()
    assert len(resumed_losses) == len(reference_losses) - stop_at
    assert resumed_losses == reference_losses[stop_at:]
    _assert_equal_states(_state(reference.model), _state(resumed.model))
    return reference, resumed


def test_cassle_resume_mid_task_is_exact(tmp_path, one_thread) -> None:
    reference, resumed = _interrupted_then_resumed(tmp_path, "CaSSLe", 8, cassle_pred_hidden=32)
    _assert_equal_states(_state(reference.method.predictor), _state(resumed.method.predictor))
    _assert_equal_states(_state(reference.method.frozen), _state(resumed.method.frozen))


def test_lump_resume_mid_task_is_exact(tmp_path, one_thread) -> None:
    reference, resumed = _interrupted_then_resumed(tmp_path, "LUMP", 8)
    assert reference.method.buffer.tolist() == resumed.method.buffer.tolist()
    assert reference.method.n_seen == resumed.method.n_seen == 12 * 8


@pytest.mark.parametrize("mix_first_task", [True, False])
def test_lump_mixes_both_views_with_one_lambda_and_buffered_images(one_thread, mix_first_task) -> None:
    """With the buffer's views replaced by zeros, a mixed batch is lam * (q, k): one lam in (0, 1)
    for both views. The buffer starts empty (the first step is not mixed), takes every trained id,
    and holds the replay budget: (2 tasks - 1) * n_save 2 * 2 classes per task = 4 ids."""
    trainer = _trainer("LUMP", lump_mix_first_task=mix_first_task)
    method = trainer.method
    assert len(method.buffer) == 4
    requested: list[np.ndarray] = []

    def zero_views(ids, n_views, batch_size, generator):
        requested.append(np.asarray(ids).copy())
        yield torch.zeros(n_views, len(ids), 3, 32, 32), torch.zeros(len(ids), 3, 32, 32)

    method.env.views = zero_views
    ratios: list[tuple[int, float | None]] = []
    trained: set[int] = set()
    original = method.before_step

    def before_step(task, batch, generator):
        held = set(method.buffer[:min(method.n_seen, len(method.buffer))].tolist())
        q, k = batch.q.clone(), batch.k.clone()
        n_requests = len(requested)
        out = original(task, batch, generator)
        if len(requested) == n_requests:
            torch.testing.assert_close(out.q, q, rtol=0, atol=0)
            ratios.append((task, None))
        else:
            assert set(requested[-1].tolist()) <= held          # buffered (earlier) images only
            lam = float((out.q.flatten() @ q.flatten()) / (q.flatten() @ q.flatten()))
            torch.testing.assert_close(out.q, lam * q)
            torch.testing.assert_close(out.k, lam * k)
            assert 0 < lam < 1
            ratios.append((task, lam))
        trained.update(batch.ids.tolist())
        return out

    method.before_step = before_step
    trainer.run()
    assert len(ratios) == 12 and ratios[0] == (0, None)
    mixed_in_task0 = [lam is not None for task, lam in ratios[1:6]]
    assert all(mixed_in_task0) if mix_first_task else not any(mixed_in_task0)
    assert all(lam is not None for task, lam in ratios[6:])
    assert len({lam for _, lam in ratios if lam is not None}) > 1    # a fresh lam per step
    assert set(method.buffer.tolist()) <= trained and method.n_seen == 12 * 8
