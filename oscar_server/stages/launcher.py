"""Run a server stage (synthesis, training) in this process, or in one process per GPU.

:func:`run_stage` runs the stage in-process when one process is asked for (``num-processes``; ``auto`` is
every visible CUDA GPU, 1 on CPU), else it starts the stage's command in child processes:

* on GPUs through ``accelerate launch --multi_gpu`` (``accelerate-config`` names an ``accelerate config``
  file; without one, accelerate's default config file applies where it exists);
* on CPU through ``torchrun --standalone``: ``accelerate launch --cpu --num_processes N`` starts a single
  process (accelerate runs multi-CPU jobs only through mpirun), while torchrun starts N, which the stage's
  ``PartialState(cpu=True)`` joins as one gloo group. CPU runs with several processes are for tests.

The children read the same run directory. They import this very copy of the project (PYTHONPATH points at
it, which matters when the ServerApp runs from a Flower app bundle), inherit the environment (HF_HUB_*
included), and their output goes line by line into this process's log. A failed child raises
:class:`StageFailed` naming the stage, the exit code and its last lines of output. The stage's summary,
``<run dir>/stages/<stage>-summary.json`` (:meth:`~oscar_server.stages.stage.Stage.read_summary`), is what
:func:`run_stage` returns, however the stage ran.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import TypeVar

import torch

from oscar_common.config import OscarConfig
from oscar_common.devices import resolve_device
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.stage import Stage

log = logging.getLogger("oscar.stages")

TAIL_LINES = 30  # lines of a failed child's output quoted in the error


SummaryT = TypeVar("SummaryT")


class StageFailed(RuntimeError):
    """A stage's child processes exited with an error."""


def num_processes(setting: str) -> int:
    """``auto``: one process per visible CUDA GPU (CUDA_VISIBLE_DEVICES applies), 1 without CUDA."""
    if setting == "auto":
        return max(1, torch.cuda.device_count())
    return int(setting)


def run_stage(stage: Stage[SummaryT], run_dir: RunDirectory, cfg: OscarConfig) -> SummaryT:
    """Run ``stage`` on ``run_dir`` and return its summary (the stage's ``-summary.json``)."""
    summary = stage.summary_path(run_dir)
    summary.unlink(missing_ok=True)  # a summary left by an earlier run must not pass for this one's
    processes = num_processes(cfg.num_processes)
    if processes == 1:
        stage.run(run_dir, cfg)
    else:
        _check_saved_config(run_dir, cfg)
        command = launch_command(stage, run_dir, cfg, processes)
        log.info("running the %s stage in %d processes: %s", stage.name, processes, " ".join(command))
        _run_child(stage, command)
    if not summary.exists():
        raise StageFailed(f"the {stage.name} stage finished without writing its summary {summary}")
    return stage.read_summary(run_dir)


def launch_command(stage: Stage, run_dir: RunDirectory, cfg: OscarConfig, processes: int) -> list[str]:
    """The command that starts ``processes`` copies of the stage (see the module docstring for why
    torchrun on CPU)."""
    if resolve_device(cfg.device).type == "cuda":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(processes)]
        if cfg.accelerate_config:
            command += ["--config_file", str(Path(cfg.accelerate_config).expanduser())]
        else:  # accelerate's fixed default port may be taken (another run on this machine)
            command += ["--main_process_port", str(_free_port())]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return command + ["-m", stage.module, str(run_dir.root)]


def child_environment() -> dict[str, str]:
    """This environment, plus the folder that holds this copy of the project first on PYTHONPATH."""
    env = dict(os.environ)
    project = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([project, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # lines reach our log as they are written
    return env


def _run_child(stage: Stage, command: list[str]) -> None:
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    child = subprocess.Popen(command, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", bufsize=1, preexec_fn=_stop_with_parent)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info("[%s] %s", stage.name, line)
        code = child.wait()
    except BaseException:
        child.terminate()  # the launcher stops its workers on SIGTERM
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    if code != 0:
        raise StageFailed(f"the {stage.name} stage failed with exit code {code} ({' '.join(command)}); "
                          f"its last lines:\n" + "\n".join(tail))


def _check_saved_config(run_dir: RunDirectory, cfg: OscarConfig) -> None:
    """Child processes read ``config.json``: it must say what ``cfg`` says."""
    path = run_dir.config_path
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved != json.loads(json.dumps(cfg.to_dict())):
        raise ValueError(f"{path} is missing or differs from the configuration this stage was asked to run "
                         "with; the stage's processes read that file: save the config first "
                         "(RunDirectory.save_config)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, so a killed ServerApp does not
    leave a launcher writing images beside the run that resumes it."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
