"""Loss terms of MoCo v2 and CCL, as pure functions of tensors (no state, no modules).

All logits are formed in at least fp32 with autocast off: with a 65,536-key queue and
temperatures of 0.04-0.2, bf16 logits would lose the small differences the softmax depends on.
Inputs in float64 stay float64 (numerical cross-checks against a reference run in float64).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast so that the matmuls below really run in fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


def at_least_fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in their common dtype, promoted to at least float32 (bf16/fp16 -> fp32,
    float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo's logits against a queue: row i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / t,
    (B, 1 + K), q and k (B, D) and queue (D, K) L2-normalized; the positive key is column 0."""
    with _fp32(q.device):
        q, k, queue = at_least_fp32(q, k, queue)
        pos = (q * k).sum(dim=1, keepdim=True)
        return torch.cat([pos, q @ queue], dim=1) / t


def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo's InfoNCE against a queue of negatives: cross-entropy of `info_nce_logits` with target
    0, i.e. mean_i ( -log softmax(logits_i)[0] ). CCL's extra-sample-queue loss is the same formula
    with the extra queue in place of the main one (`extra_queue_loss`)."""
    return info_nce_from_logits(info_nce_logits(q, k, queue, t))


def info_nce_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, 1 + K) logits whose column 0 is the positive."""
    with _fp32(logits.device):
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)


extra_queue_loss = info_nce_queue


def distillation_kl(s_q: torch.Tensor, s_a: torch.Tensor, t_q: torch.Tensor, t_a: torch.Tensor,
                    is_old: torch.Tensor, t_student: float = 0.07, t_teacher: float = 0.04,
                    group: int = 0) -> torch.Tensor:
    """CCL's self-supervised distillation on the replayed ("old") samples of a batch.

    Arguments are whole-batch tensors: student query and anchor embeddings `s_q`, `s_a` (B, D),
    the teacher's `t_q`, `t_a` (B, D; treated as constants), and `is_old` (B,) bool or 0/1. All
    embeddings are L2-normalized here (idempotent if they already are). For the n old samples
    of a slice::

        S = s_q_old @ s_a_old.T / t_student          (n, n)
        T = t_q_old @ t_a_old.T / t_teacher          (n, n)
        L = (1/n) sum_i KL( softmax(T_i) || softmax(S_i) )

    `group = 0`: one slice, the whole batch. `group > 0`: the batch is cut into consecutive slices
    of `group` samples (the last may be shorter), as the authors' 8-GPU DDP cuts a batch of 256 into
    32-sample slices, one per GPU. A slice with no old sample contributes 0, and the result is the
    mean over *all* slices, because DDP averages gradients over ranks, each rank holding one slice.
    With no old sample at all the result is a zero that still has a grad path to `s_q`.
    """
    with _fp32(s_q.device):
        s_q, s_a, t_q, t_a = (F.normalize(x, dim=1)
                              for x in at_least_fp32(s_q, s_a, t_q.detach(), t_a.detach()))
        b = s_q.shape[0]
        size = b if group <= 0 else group
        n_slices = -(-b // size)
        old = is_old.to(device=s_q.device, dtype=torch.bool)
        slice_id = torch.arange(b, device=s_q.device) // size
        # Pairs (i, j) that see each other: both old and in the same slice. Everything else is
        # pushed to -1e9 (not -inf, which would make 0 * inf = NaN in the KL): the teacher gives
        # it probability exactly 0, so it adds nothing, and rows of new samples (all masked) have
        # identical uniform student and teacher distributions, i.e. KL 0, and no gradient.
        pair = old[:, None] & old[None, :] & (slice_id[:, None] == slice_id[None, :])
        student = (s_q @ s_a.t() / t_student).masked_fill(~pair, -1e9)
        teacher = (t_q @ t_a.t() / t_teacher).masked_fill(~pair, -1e9)
        row_kl = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1),
                          reduction="none", log_target=True).sum(dim=1) * old
        per_slice = row_kl.new_zeros(n_slices).index_add(0, slice_id, row_kl)
        count = row_kl.new_zeros(n_slices).index_add(0, slice_id, old.to(row_kl.dtype))
        return (per_slice / count.clamp(min=1)).mean()


def min_variance_spread(view_feats: torch.Tensor) -> torch.Tensor:
    """How much an image's embedding moves across views; CCL replays the steadiest images.

    view_feats (V, N, D), each row L2-normalized. With m_n = normalize(mean_v f_{v,n})::

        spread_n = sum_v sum_d (f_{v,n,d} - m_{n,d})^2          -> (N,)
    """
    (f,) = at_least_fp32(view_feats)
    mean = F.normalize(f.mean(dim=0), dim=1)
    return (f - mean).pow(2).sum(dim=(0, 2))


def contrastive_distillation(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                             t: float = 0.2) -> torch.Tensor:
    """CaSSLe's contrastive distillation (Fini et al. 2022): the student's predictions of both
    views contrasted with the frozen previous-task projections of both views, in both directions.

    `p1`, `p2` (b, D): the predictor's outputs for views 1 and 2 (with grad); `z1`, `z2` (b, D): the
    frozen encoder's projections of the same views (treated as constants). All are L2-normalized
    here. With P = normalize([p1; p2]) and Z = normalize([z1; z2]), both (2b, D)::

        S = P Z^T / t                                                    (2b, 2b)
        L = ( CE_rows(S) + CE_rows(S^T) ) / 2,   CE_rows(A) = mean_i ( -log softmax(A_i)[i] )

    The positive of a prediction is the frozen projection of the *same view* of the same image;
    every other of the 2b frozen projections is a negative, the image's other view included (the
    reference's mask keeps every column). The second term reads the matrix by columns: each
    frozen projection against all 2b predictions. Negatives are this call's rows only (the
    reference gathers nothing across GPUs).
    """
    with _fp32(p1.device):
        p1, p2, z1, z2 = at_least_fp32(p1, p2, z1.detach(), z2.detach())
        p = F.normalize(torch.cat([p1, p2]), dim=1)
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = p @ z.t() / t
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
