"""What the server stages' commands share: ``RUN_DIR [--fresh] [--set key=value ...]``
(:func:`run_stage_command`), the run's config, and log lines that say which process wrote them.

A stage reads its settings from ``<run dir>/config.json`` (written by the ServerApp when the run starts);
``--set`` changes some of them for this invocation only (run-config keys, kebab-case), e.g. to rerun a
stage by hand with other settings together with ``--fresh``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch.distributed as dist
from accelerate import PartialState

from oscar_common.config import OscarConfig
from oscar_common.logs import FORMAT, interactive, setup_logging
from oscar_server.run_dir import RunDirectory

T = TypeVar("T")
# Errors of a bad RUN_DIR or --set: said plainly by every stage's command
CONFIG_ERRORS = (FileNotFoundError, ValueError)


def run_stage_command(argv: list[str] | None, *, prog: str, description: str,
                      run: Callable[..., object], plain_errors: tuple[type[Exception], ...]) -> None:
    """A stage's command: parse ``argv``, read the run's config, then ``run(run_dir, cfg, fresh=...)``. A bad
    run directory or ``--set``, and ``plain_errors`` from the stage, end the command with their message
    alone (they say what to do; a traceback would bury it)."""
    args = stage_arguments(prog, description).parse_args(argv)
    setup_stage_logging()
    run_dir = open_run_directory(args.run_dir)
    try:
        cfg = load_stage_config(run_dir, args.overrides)
    except CONFIG_ERRORS as exc:
        raise SystemExit(f"{prog}: {exc}") from exc
    try:
        run(run_dir, cfg, fresh=args.fresh)
    except plain_errors as exc:
        raise SystemExit(f"{prog}: {exc}") from exc
    finally:
        # Under a launcher: a gloo group left to the interpreter's exit can abort the process
        # ("terminate called without an active exception") after the stage's work is done.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def stage_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="an OSCAR run directory (holds config.json)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard this stage's outputs in RUN_DIR and start it again")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key of RUN_DIR/config.json for this invocation (repeatable)")
    return parser


def load_stage_config(run_dir: RunDirectory, overrides: list[str]) -> OscarConfig:
    """The run's config from ``config.json``, with ``KEY=VALUE`` overrides; unknown keys are errors."""
    path = run_dir.config_path
    if not path.exists():
        raise FileNotFoundError(f"{run_dir.root} is not an OSCAR run directory: it has no config.json "
                                "(the ServerApp writes one when a run starts)")
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (a run-config key such as guidance-scale=5), got {item!r}")
        changes[key.strip()] = value.strip()
    cfg = OscarConfig.from_run_config({**json.loads(path.read_text()), **changes})
    unknown = sorted(set(changes) & set(cfg.extra))
    if unknown:
        raise ValueError(f"unknown run-config key(s) in --set: {unknown}; known keys: {sorted(cfg.to_dict())}")
    return cfg


def open_run_directory(path: str) -> RunDirectory:
    return RunDirectory(Path(path).expanduser().resolve())


def setup_stage_logging() -> None:
    """Logging for a stage's process; with several processes (torchrun and ``accelerate launch`` set RANK
    and WORLD_SIZE) each line names its process. Off a terminal, the libraries' loading bars stay quiet
    (each redraw would be a log line of its own)."""
    setup_logging()
    if not interactive():
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank = os.environ.get("RANK", "?")
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(FORMAT.replace("%(name)s", f"[rank {rank}/{world}] %(name)s")))


def on_first_process(state: PartialState, work: Callable[[], T], *, errors: tuple[type[Exception], ...]) -> T:
    """Run ``work`` on the first process only and give every process its result, or its error: one of
    ``errors`` is raised again as itself everywhere, anything else as a RuntimeError with its message."""
    if state.num_processes == 1:
        return work()
    outcome: list[Any] = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = work()
        except Exception as exc:  # every process must learn of it, or the others wait forever
            outcome[1] = (type(exc).__name__, str(exc))
            raise
        finally:
            dist.broadcast_object_list(outcome, src=0)
    else:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        kind, message = outcome[1]
        raise {e.__name__: e for e in errors}.get(kind, RuntimeError)(message)
    return outcome[0]
