"""Checks that only a CUDA device can answer (marked `gpu`, skipped without one).

The CPU suite proves the algorithm; these prove the GPU paths run the same algorithm: the
trainer in bf16 + channels_last with the data resident on the device, the CCL step, replay
selection and k-means on the device, grouped key BatchNorm on CUDA vs CPU, the lincls protocol.
`benchmarks/gpu_session.sh` runs them first in a device session.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cclnb import train
from cclnb.config import TrainConfig
from cclnb.training.models import MoCo
from cclnb.training.replay import kmeans, select_min_variance

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gpu_config(tmp_path, method: str, **overrides) -> TrainConfig:
    values = dict(data="demo", arch="resnet18", epochs=1, batch_size=64, moco_k=256, ccl_k=64,
                  n_tasks=2, n_save=5, method=method, seed=0, progress=False, mlp=True,
                  moco_t=0.2, cos=True, eval_each_task="knn", eval_teacher=True, knn_k=20,
                  run_dir=str(tmp_path / method), device="cuda", precision="bf16")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", ["Finetuning", "SimpleReplay", "CCL", "Joint"])
def test_each_method_trains_two_tasks_on_the_gpu_in_bf16(tmp_path, method):
    run = train(_gpu_config(tmp_path, method))
    status = json.loads((run / "status.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert status["state"] == "complete"
    assert config["loader"] == "tensor"
    matrix = (run / "eval" / "acc_knn_student.csv").read_text().splitlines()
    assert len(matrix) == (2 if method == "Joint" else 3)


def test_grouped_key_batchnorm_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = MoCo("resnet18", 128, 256, True, small_images=True)
    images = torch.randn(32, 3, 32, 32)
    cpu = model.key_forward(images, groups=8, generator=torch.Generator().manual_seed(1))
    gpu = model.cuda().key_forward(images.cuda(), groups=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)


def test_min_variance_selection_on_the_device_matches_the_cpu():
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(7, 2000, 128, generator=gen), dim=2)
    ids = np.arange(2000) + 10_000
    cpu = select_min_variance(feats, feats[-1], ids, 10, 20, seed=3)
    gpu = select_min_variance(feats.cuda(), feats[-1].cuda(), ids, 10, 20, seed=3)
    assert len(cpu) <= 200
    # k-means in fp32 on two devices can break near-ties differently: demand a large overlap.
    assert len(set(cpu) & set(gpu)) >= 0.9 * len(cpu)
    labels = kmeans(feats[-1].cuda(), 10, seed=3)
    assert labels.device.type == "cuda" and int(labels.max()) <= 9
