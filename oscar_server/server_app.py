"""OSCAR's Flower ServerApp: check the config and the machine, run the one-shot strategy, write the report.

The last line a run logs is ``OSCAR status: completed|partial|failed — ...`` (``flwr run`` itself exits 0
whatever happens to the run, so scripts read this line or report.json). A failed run also fails in Flower
(``flwr ls`` shows it), with the original traceback logged once before that.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from oscar_common.config import OscarConfig
from oscar_common.logs import setup_logging
from oscar_server.preflight import preflight, warn_if_flower_installed_dependencies
from oscar_server.report import client_table, status_line, write_report
from oscar_server.run_dir import FinishedRunError, RunDirectory
from oscar_server.strategy import OscarStrategy, RunState

log = logging.getLogger("oscar.server")
app = ServerApp()


class RunFailed(RuntimeError):
    """Raised last, so Flower records the run as failed; its message is the status line."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    warn_if_flower_installed_dependencies()
    try:
        cfg = OscarConfig.from_run_config(context.run_config)
    except ValueError as exc:
        log.error("%s", exc)
        raise RunFailed(f"OSCAR status: failed — {exc} (nothing was run)") from None
    run_dir = RunDirectory.for_run(cfg, context.run_id)
    try:
        run_dir.refuse_if_finished()  # checked before anything is written into it
    except FinishedRunError as exc:
        log.error("%s", exc)
        raise RunFailed(f"OSCAR status: failed — {exc}") from None
    started = time.monotonic()
    strategy: OscarStrategy | None = None
    try:
        preflight(cfg, run_dir.root)
        run_dir.save_config(cfg)
        strategy = OscarStrategy(cfg, run_dir)
        state = strategy.start(grid)
    except Exception as exc:
        # Whatever happened, leave a report that says how far the run got and why it stopped.
        log.error("OSCAR run failed", exc_info=exc)
        state = strategy.state if strategy is not None else RunState()
        state.timings["server"] = time.monotonic() - started
        report = write_report(cfg, run_dir, state, error=f"{type(exc).__name__}: {exc}")
        raise RunFailed(status_line(report, run_dir)) from None
    state.timings["server"] = time.monotonic() - started
    report = write_report(cfg, run_dir, state)
    log.info("OSCAR run finished in %.1fs\n%s", state.timings["server"], client_table(report))
    log.info("report: %s | %s | %s", run_dir.report_json, run_dir.report_md, run_dir.samples_png)
    log.info("%s", status_line(report, run_dir))
