"""`cclnb bench` on the CPU with tiny sizes: the table has its rows and columns and lands in a file;
the FLOP count and the matmul peak behind its "% of peak" columns are checked on their own."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from cclnb.commands.cli import main
from cclnb.training.bench import count_flops, matmul_peak_gflops, row_precisions, time_steps
from cclnb.training.precision import resolve_precision
from cclnb.training.step_profile import profile_markdown, profile_step

ROWS = ("1. authors: PIL + torchvision + DataLoader (1 workers)",
        "2. cclnb fast path: uint8 on device + BatchMoCoV2Augment",
        "3. ceiling: pre-augmented batches on device")
PERCENT = r"\d+%"


def test_cpu_tiny_bench_prints_the_table_and_writes_it(tmp_path, capsys):
    out = tmp_path / "bench.md"
    code = main(["bench", "--device", "cpu", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8",
                 "--steps", "1", "--warmup", "1", "--workers", "1", "--data", "demo", "--precision", "both",
                 "--profile", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    table = out.read_text()
    assert table in printed
    table, profile = table.split("## Where a step's time goes")   # --profile: a section after the table
    assert re.search(r"- MoCo step: [\d.]+ ms wall per step \(profiled, 1 steps\); host ops busy", profile)
    assert "| CCL: op | self ms / step |" in profile
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    # The img/s columns keep positions 3 and 5 (benchmarks/plan_epochs.py reads them).
    assert lines[0].startswith("| pipeline | precision | first batch (s) | MoCo img/s | MoCo / ceiling | "
                               "CCL img/s | CCL / ceiling | MoCo GFLOP/s | MoCo % of peak | CCL GFLOP/s | "
                               "CCL % of peak |")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    native = resolve_precision("auto", "cpu")
    other = "fp32" if native == "bf16" else "bf16"
    assert [(cells[0], cells[1]) for cells in body] == [(name, p) for p in (native, other) for name in ROWS]
    for name, _, first, moco, moco_ratio, ccl, ccl_ratio, moco_gflops, moco_peak, ccl_gflops, ccl_peak in body:
        assert float(moco.replace(",", "")) > 0 and float(ccl.replace(",", "")) > 0   # 3 digits below 100
        assert re.fullmatch(PERCENT, moco_ratio) and re.fullmatch(PERCENT, ccl_ratio)
        assert float(moco_gflops.replace(",", "")) > 0 and float(ccl_gflops.replace(",", "")) > 0
        assert re.fullmatch(r"\d+\.\d%", moco_peak) and re.fullmatch(r"\d+\.\d%", ccl_peak)
        assert (first == "-") == name.startswith("3.")
        if name.startswith("3."):      # each precision's ceiling is its own reference
            assert moco_ratio == ccl_ratio == "100%"
    assert "- device: CPU" in table and "- commit: " in table and "demo-shapes" in table
    # 3 significant digits below 100: bf16 on a CPU without native bf16 must not print as 0
    assert re.search(rf"- matmul peak: {native} [\d,.]+ GFLOP/s, {other} [\d,.]+ GFLOP/s", table)
    assert "GFLOP/s, bf16 0 GFLOP/s" not in table and "fp32 0 GFLOP/s" not in table
    above = any(float(cells[i].rstrip("%")) > 100 for cells in body for i in (8, 10))
    assert ("- % of peak above 100%" in table) == above
    flops = re.search(r"- FLOPs per image: MoCo step ([\d.]+) GFLOP \(= ([\d.]+) forwards\), "
                      r"CCL step ([\d.]+) GFLOP \(= ([\d.]+) forwards\)", table)
    assert flops is not None
    moco_forwards, ccl_forwards = float(flops[2]), float(flops[4])
    # q forward + backward (~3 forwards, the stem needs no input gradient) + key forward; CCL adds
    # the extra queue and, on batches with replayed rows, the student's anchor forward + backward
    # and two teacher forwards (batch 8 at 20% replay: some of the 4 counted batches have none).
    assert 3.5 < moco_forwards <= 4.2 and ccl_forwards > moco_forwards


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


def test_count_flops_matches_the_analytic_count_forward_and_backward():
    torch.manual_seed(0)
    n, c_in, c_out, side, k, classes = 2, 3, 4, 5, 3, 6
    model = nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(c_out * side * side, classes))
    x = torch.randn(n, c_in, side, side)
    conv = 2 * n * c_out * side * side * c_in * k * k          # 2 FLOPs per multiply-add
    linear = 2 * n * c_out * side * side * classes
    assert count_flops(lambda: model(x)) == conv + linear
    # backward: the linear layer needs the weight and the input gradient, the conv only the weight
    # gradient (its input requires none): the reason a step is not simply 3 forwards.
    assert count_flops(lambda: model(x).sum().backward()) == conv + linear + 2 * linear + conv


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matmul_peak_is_a_positive_finite_rate(precision):
    peak = matmul_peak_gflops(torch.device("cpu"), precision, size=128, repeats=2, min_time_s=0.01)
    assert math.isfinite(peak) and peak > 0


def test_row_precisions_put_the_native_choice_first():
    cpu = torch.device("cpu")
    native = resolve_precision("auto", cpu)
    assert row_precisions("auto", cpu) == [native]
    assert row_precisions("fp32", cpu) == ["fp32"]
    both = row_precisions("both", cpu)
    assert both[0] == native and sorted(both) == ["bf16", "fp32"]


def test_profile_step_ranks_ops_by_self_time_and_renders_a_section():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))
    batches = iter([torch.randn(4, 3, 6, 6) for _ in range(3)])

    def step(x: torch.Tensor) -> None:
        model(x).sum().backward()

    profile = profile_step("toy", step, batches, n_steps=3, device=torch.device("cpu"), top_n=5)
    assert profile.steps == 3 and len(profile.top) == 5
    assert 0 < profile.busy_ms and 0 < profile.wall_ms
    shares = [ms for _, ms, _ in profile.top]
    assert shares == sorted(shares, reverse=True)
    assert any("conv" in op for op, _, _ in profile.top)                     # the convolution is among the costliest
    section = profile_markdown([profile], "cpu")
    assert "- toy step: " in section and "host ops busy" in section
    assert section.count("\n| `") == 5


def test_decode_rows_on_mixed_size_jpegs(tmp_path):
    """The device-decode rows on JPEG files of different sizes, the ceiling made of decoded batches;
    the uint8 fast path is left out, saying why."""
    from test_jpeg import _jpeg_folder

    data = _jpeg_folder(tmp_path / "data", n_classes=4)
    out = tmp_path / "bench.md"
    assert main(["bench", "--device", "cpu", "--image-size", "16", "--width", "4", "--batch-size", "4",
                 "--steps", "1", "--warmup", "1", "--workers", "1", "--precision", "fp32", "--data", str(data),
                 "--rows", "fast,decode,decode-prefetch,ceiling", "--out", str(out)]) == 0
    table = out.read_text()
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")][1:]
    assert [cells[0].split(" ")[0] for cells in body] == ["2c.", "2d.", "3."]
    assert all(float(cells[3]) > 0 and float(cells[5]) > 0 for cells in body)     # MoCo and CCL img/s
    assert float(body[0][2]) > 0                                                  # the first decoded batch
    assert "uint8 rows left out: the images differ in size" in table
    assert re.search(r"- device decode \(read, decode_jpeg, crops, colour\) alone .*: [\d,.]+ img/s", table)


def test_rows_are_checked_and_a_partial_table_shows_dashes():
    from cclnb.training.bench import BenchOptions, BenchResult, Row

    with pytest.raises(Exception, match="--rows 'fast,warp': choose 'all' or a comma-separated list of authors"):
        BenchOptions(rows="fast,warp").validate()
    assert BenchOptions(rows="ceiling, prefetch").row_keys() == ["prefetch", "ceiling"]
    rows = [Row("3. ceiling", "fp32", reference=True), Row("2a. prefetch", "fp32")]
    rows[0].img_per_s["MoCo"] = 100.0
    rows[1].img_per_s["MoCo"] = 50.0
    result = BenchResult(BenchOptions(), "cpu", rows, {}, [], {"fp32": 1000.0}, {"MoCo": 1e9, "CCL": 2e9})
    line = next(line for line in result.to_markdown().splitlines() if line.startswith("| 2a."))
    assert line == "| 2a. prefetch | fp32 | - | 50 | 50% | - | - | 50 | 5.0% | - | - |"
