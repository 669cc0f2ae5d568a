"""Loss terms of MoCo v2 and CCL, as pure functions of tensors (no state, no modules).

All logits are formed in fp32 with autocast off: with a 65,536-key queue and temperatures of
0.04-0.2, bf16 logits would lose the small differences the softmax depends on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast so that the matmuls below really run in fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo's InfoNCE against a queue of negatives.

    With q, k (B, D) L2-normalized and queue (D, K) of normalized keys::

        logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / t
        loss     = mean_i ( -log softmax(logits_i)[0] )

    i.e. cross-entropy with target 0 (the positive key is class 0). CCL's extra-sample-queue loss
    is the same formula with the extra queue in place of the main one (`extra_queue_loss`).
    """
    with _fp32(q.device):
        q, k, queue = q.float(), k.float(), queue.float()
        pos = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, q @ queue], dim=1) / t
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
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
        s_q, s_a = F.normalize(s_q.float(), dim=1), F.normalize(s_a.float(), dim=1)
        t_q, t_a = F.normalize(t_q.detach().float(), dim=1), F.normalize(t_a.detach().float(), dim=1)
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
        per_slice = torch.zeros(n_slices, device=s_q.device).index_add(0, slice_id, row_kl)
        count = torch.zeros(n_slices, device=s_q.device).index_add(0, slice_id, old.float())
        return (per_slice / count.clamp(min=1)).mean()


def min_variance_spread(view_feats: torch.Tensor) -> torch.Tensor:
    """How much an image's embedding moves across views; CCL replays the steadiest images.

    view_feats (V, N, D), each row L2-normalized. With m_n = normalize(mean_v f_{v,n})::

        spread_n = sum_v sum_d (f_{v,n,d} - m_{n,d})^2          -> (N,)
    """
    f = view_feats.float()
    mean = F.normalize(f.mean(dim=0), dim=1)
    return (f - mean).pow(2).sum(dim=(0, 2))
