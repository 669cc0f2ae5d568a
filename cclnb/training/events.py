"""TensorBoard event files beside a run's train_log.csv (`TrainConfig.tensorboard`), for live curves.

Off by default, and `tensorboard` is an optional extra (`pip install 'cclnb[tensorboard]'`): the
CSV files stay the run's record; the event files only let `tensorboard --logdir runs/<study>` draw
every run's curves while they train. tensorboard is imported only when a run asks for it, and a
run that asks without it installed stops before training with a `ConfigError` saying how to get it.

What is written: every numeric value of a train_log.csv row under `train/<column>` at its global
step, whatever columns the method logs (the loss terms are `loss_<term>` per method), so the
event files and the CSV hold the same numbers; and the per-task accuracies of
`eval/acc_<protocol>_<who>.csv` under `eval/<protocol>_<who>/task_<j>` and `.../all` at the task
after which they were measured. A resumed run redoes the steps after its checkpoint: its writer
starts at that step with TensorBoard's `purge_step`, which hides the earlier files' events from
there on, as `TrainLog.discard_after` drops the CSV's rows.
"""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path
from typing import Any, Mapping

from cclnb.errors import ConfigError

FLUSH_S = 10   # a live curve lags the CSV by at most this much (TensorBoard's default: 120 s)


def check_available() -> None:
    """Refuse before any work when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard=True writes TensorBoard event files, which needs the tensorboard "
                          "package: pip install 'cclnb[tensorboard]' (or pip install tensorboard), or "
                          "leave tensorboard off (train_log.csv is written either way)")


class EventWriter:
    """Scalars into TensorBoard event files in `folder`, opened at the first scalar."""

    def __init__(self, folder: str | Path) -> None:
        check_available()
        self.folder = Path(folder)
        self.purge_step: int | None = None
        self._writer: Any = None

    def purge_after(self, step: int) -> None:
        """Events of earlier files at steps after `step` are redone (a resume): hide them."""
        self.purge_step = step + 1

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=self.purge_step, flush_secs=FLUSH_S)
        return self._writer

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Every real number of `values` as `<prefix>/<name>` at `step` (flags, text and empty
        values are skipped), flushed at once so that TensorBoard shows it."""
        writer = self._open()
        for name, value in values.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                writer.add_scalar(f"{prefix}/{name}", float(value), int(step))
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
