"""One notebook step executed by papermill, with the kernel arguments every study step gets.

Why not papermill's command line for the steps a study runs in their own processes: it cannot pass
arguments to the kernel, so ipykernel's start-up warning that its local TCP sockets are unencrypted
(noise to a study's user) landed in every step's log. `python -m cclnb.study.papermill_step
NOTEBOOK OUTPUT PARAMETERS.json` does what `papermill NOTEBOOK OUTPUT -f PARAMETERS.json -k python3
--log-output --no-progress-bar --cwd <output's folder>` did, with the kernel's log level at ERROR:
the same executed copy, the same cell-by-cell log, a non-zero exit status when a cell raises.
A step's process imports papermill and this module only (`cclnb.study` imports its modules on
first use): the rest of the study imports torch, seconds per step before its kernel even starts.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

# Arguments of every notebook's kernel. ipykernel warns at every start that its local TCP sockets
# are unencrypted, which tells a study's user nothing; its errors still show.
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=ERROR",)


def execute(notebook: Path, output: Path, parameters: Mapping[str, Any],
            stream: TextIO | None = None) -> None:
    """Execute `notebook` into `output` (run in `output`'s folder, which must exist) with the
    `python3` kernel; `stream`: where the cells' output goes as they run (None: papermill's logger,
    as its `--log-output`)."""
    import papermill

    papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters),
                               kernel_name="python3", progress_bar=False, log_output=True,
                               stdout_file=stream, stderr_file=stream, cwd=str(output.parent),
                               extra_arguments=list(KERNEL_ARGUMENTS))


def main(argv: Sequence[str] | None = None) -> int:
    notebook, output, parameters = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill's CLI does the same
    execute(Path(notebook), Path(output), json.loads(Path(parameters).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
