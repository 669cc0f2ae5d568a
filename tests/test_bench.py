"""`cclnb bench` on the CPU with tiny sizes: the table has the three rows and lands in a file."""

from __future__ import annotations

import re

import torch

from cclnb.bench import time_steps
from cclnb.cli import main

ROWS = ("1. authors: PIL + torchvision + DataLoader (1 workers)",
        "2. cclnb fast path: uint8 on device + BatchMoCoV2Augment",
        "3. ceiling: pre-augmented batches on device")


def test_cpu_tiny_bench_prints_the_table_and_writes_it(tmp_path, capsys):
    out = tmp_path / "bench.md"
    code = main(["bench", "--device", "cpu", "--arch", "resnet18", "--batch-size", "8", "--steps", "1",
                 "--warmup", "1", "--workers", "1", "--data", "demo", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    table = out.read_text()
    assert table in printed
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| pipeline | precision | first batch (s) | MoCo img/s | MoCo / ceiling")
    body = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[1:]}
    assert tuple(body) == ROWS                         # no GPU-only rows on the CPU
    for name, cells in body.items():
        precision, first, moco, moco_ratio, ccl, ccl_ratio = [c.strip(" |") for c in cells]
        assert precision == "fp32"
        assert float(moco.replace(",", "")) > 0 and float(ccl.replace(",", "")) > 0
        assert re.fullmatch(r"\d+%", moco_ratio) and re.fullmatch(r"\d+%", ccl_ratio)
        assert (first == "-") == name.startswith("3.")
    assert body[ROWS[2]][3].strip() == "100%"
    assert "- device: CPU" in table and "- commit: " in table and "demo-digits" in table


def test_bench_rejects_bad_options(capsys):
    assert main(["bench", "--device", "cpu", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_time_steps_excludes_warmup_and_counts_images():
    seen: list[int] = []
    batches = iter(range(10))
    first_s, speed = time_steps(seen.append, lambda: batches, warmup=3, steps=4, batch_size=5,
                                device=torch.device("cpu"))
    assert seen == list(range(7))          # 3 warm-up (the first batch included) + 4 timed
    assert first_s >= 0 and speed > 0
