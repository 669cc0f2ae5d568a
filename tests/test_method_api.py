"""A method is one file: written outside cclnb, loaded by `--method-module`, trained by the
shared loop with its own trainable module, its options and its loss term, resumed exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from cclnb.commands.cli import main
from cclnb.config import TrainConfig
from cclnb.errors import CheckpointError, ConfigError, Interrupted
from cclnb.study.records import write_record
from cclnb.training.loop import _loss_sums
from cclnb.training.methods import registry
from test_trainer import load_ckpt, one_thread  # noqa: F401  (fixture re-used)

PLUGIN = '''
"""A method outside cclnb: a trainable head on the student's projection, pulled to the key."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cclnb.errors import ConfigError
from cclnb.training.methods.base import Method


@dataclass
class HeadPullOptions:
    headpull_weight: float = field(default=0.5, metadata={"help": "weight of the head's term"})

    def __post_init__(self):
        if self.headpull_weight < 0:
            raise ConfigError("--headpull-weight must be >= 0")


class HeadPull(Method):
    name = "HeadPull"
    Options = HeadPullOptions
    loss_terms = ("head",)
    step_cost = 1.2

    def __init__(self, env):
        super().__init__(env)
        self.head = nn.Linear(env.config.moco_dim, env.config.moco_dim)

    def trainable_modules(self):
        return {"head": self.head}

    def extra_losses(self, task, batch, out):
        p = F.normalize(self.head(out.z), dim=1)
        return {"head": self.options.headpull_weight * (2 - 2 * (p * out.k).sum(1).mean())}
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "headpull.py"
    path.write_text(PLUGIN, encoding="utf-8")
    return path


def cli_args(plugin: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--data", "demo", "-a", "resnet18", "--stem", "imagenet", "--epochs", "2", "-b", "16",
            "--moco-k", "64", "--n-tasks", "2", "--n-save", "2", "--subset-per-class", "10", "--seed", "0",
            "-j", "0", "--no-progress", "--eval-each-task", "none", "--key-bn-groups", "4", "--bn-groups", "2",
            "--device", "cpu", "--deterministic", "--save-every", "1", "--run-dir", str(run_dir),
            "--method-module", str(plugin), "--method", "HeadPull", *extra]


def test_a_method_from_a_file_trains_its_module_under_its_option_and_logs_its_term(tmp_path, plugin, one_thread):
    run = tmp_path / "run"
    assert main(cli_args(plugin, run, "--headpull-weight", "0.25")) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "HeadPull" and config["headpull_weight"] == 0.25
    assert config["method_module"] == str(plugin) and "ccl_k" not in config     # only its own options
    log = pd.read_csv(run / "train_log.csv")
    assert "loss_head" in log.columns and "loss_extra" not in log.columns and (log["loss_head"] > 0).all()
    first, last = load_ckpt(run / "checkpoints" / "task_0.pt"), load_ckpt(run / "checkpoints" / "last.pt")
    assert len(last["optimizer"]["param_groups"]) == 2          # the encoder, then the head
    assert not torch.equal(first["method_modules"]["head"]["weight"], last["method_modules"]["head"]["weight"])
    assert "trainable parameters: encoder" in (run / "train.log").read_text()
    record = json.loads(write_record(run, tmp_path / "records", "plugin").read_text())
    assert record["train_loss"]["columns"][3:6] == ["loss", "loss_moco", "loss_head"]   # its term, by name


def test_a_method_from_a_file_resumes_bit_identically(tmp_path, plugin, monkeypatch, one_thread):
    reference = tmp_path / "ref"
    assert main(cli_args(plugin, reference)) == 0
    cls = registry.method_class("HeadPull")
    original, calls = cls.after_step, {"n": 0}

    def after_step(self, batch, keys_all, is_old_all):
        original(self, batch, keys_all, is_old_all)
        calls["n"] += 1
        if calls["n"] == 4:                            # mid task 0, epoch 1
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cls, "after_step", after_step)
    cut = tmp_path / "cut"
    assert main(cli_args(plugin, cut)) == Interrupted.exit_code
    monkeypatch.setattr(cls, "after_step", original)
    assert main(cli_args(plugin, cut, "--resume", str(cut))) == 0
    a, b = load_ckpt(reference / "checkpoints" / "last.pt"), load_ckpt(cut / "checkpoints" / "last.pt")
    for part in ("model", "method_modules"):
        flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            torch.testing.assert_close(flat_a[name], flat_b[name], rtol=0, atol=0, msg=f"{part}.{name}")
    timeless = ["task", "epoch", "step", "global_step", "loss", "loss_moco", "loss_head"]
    assert (pd.read_csv(cut / "train_log.csv")[timeless].to_dict("records")
            == pd.read_csv(reference / "train_log.csv")[timeless].to_dict("records"))


def _flatten(state: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_resolving_a_config_fills_checks_and_scopes_the_methods_options(plugin):
    registry.load(str(plugin))
    ccl = registry.resolve(TrainConfig(method="cll", ccl_k=8))
    assert ccl.method == "CCL" and ccl.ccl_k == 8 and ccl.ccl_t_teacher == 0.04      # defaults filled
    shared = registry.resolve(TrainConfig(method="Finetuning", ccl_k=8, headpull_weight=1.0))
    assert shared.method_options == {}                 # a preset's options for other methods: dropped
    with pytest.raises(ConfigError, match=r"unknown configuration key\(s\) \['ccl_kk'\].*ccl_k"):
        registry.resolve(TrainConfig(method="CCL", ccl_kk=8))
    with pytest.raises(ConfigError, match="headpull-weight must be >= 0"):
        registry.resolve(TrainConfig(method="HeadPull", headpull_weight=-1.0))
    with pytest.raises(ConfigError, match="unknown method 'Nope'.*--method-module"):
        registry.resolve(TrainConfig(method="Nope"))
    assert registry.resolve(ccl) == ccl                # idempotent
    assert TrainConfig.from_dict(ccl.to_dict()) == ccl  # config.json round trip (flat options)


def test_the_registry_refuses_ambiguous_names_and_options() -> None:
    from dataclasses import dataclass

    from cclnb.training.methods.base import Method

    class Clash(Method):
        name = "ccl"

    with pytest.raises(ConfigError, match="already has"):
        registry.register(Clash)

    @dataclass
    class Bad:
        lr: float = 0.1

    class BadOptions(Method):
        name = "BadOptions"
        Options = Bad

    with pytest.raises(ConfigError, match="'lr' is already a TrainConfig field"):
        registry.register(BadOptions)


def test_a_method_option_is_a_study_parameter_that_reaches_the_notebook_in_extra(tmp_path, plugin):
    from cclnb.study import plan_study

    study = plan_study("demo", ["ccl_k=8", f"method_module={plugin}", "headpull_weight=0.75"],
                       runs_root=tmp_path / "runs", reports_root=tmp_path / "reports",
                       methods=["CCL", "HeadPull"], seeds=[0], baseline=False)
    first = {s.label: s for s in study.steps}
    ccl, head = first["CCL seed 0: task sequence"], first["HeadPull seed 0: task sequence"]
    assert ccl.parameters["extra"]["ccl_k"] == 8 and "ccl_k" not in ccl.parameters
    assert head.parameters["method_module"] == str(plugin.resolve())
    assert head.cost == 1.2 and "HeadPull seed 0: linear eval (teacher)" not in first
    with pytest.raises(ConfigError, match="unknown parameter 'headpul_weight'"):
        plan_study("demo", ["headpul_weight=1"], runs_root=tmp_path / "runs", reports_root=tmp_path / "r")


def test_a_checkpoint_from_before_named_loss_terms_resumes_its_epoch_mean() -> None:
    """Checkpoints of the earlier format hold [total, moco, extra, distill] for every method."""
    assert _loss_sums(([5.0, 4.0, 0.0, 0.0], 3), ("total", "moco")) == ([5.0, 4.0], 3)
    assert _loss_sums(([5.0, 4.0, 0.5, 0.5], 3), ("total", "moco", "extra", "distill")) == ([5.0, 4.0, 0.5, 0.5], 3)
    assert _loss_sums(None, ("total", "moco")) is None


def test_a_checkpoint_of_the_earlier_format_loads_into_todays_trainer(tmp_path) -> None:
    """Before the method API a checkpoint had no `method_modules` and four loss sums whatever the
    method; today's trainer of the same method loads it, and a method with modules refuses it."""
    from test_methods import make_trainer

    trainer, _ = make_trainer(tmp_path, "Finetuning")
    state = trainer.state()
    del state["method_modules"]
    state["epoch_losses"] = ([6.0, 5.5, 0.0, 0.0], 3)
    again, _ = make_trainer(tmp_path, "Finetuning")
    again.load(state)
    assert again.epoch_losses == ([6.0, 5.5], 3)
    cassle, _ = make_trainer(tmp_path, "CaSSLe")
    with pytest.raises(CheckpointError, match=r"method modules \[\].*trains \['predictor'\]"):
        cassle.load(state)
