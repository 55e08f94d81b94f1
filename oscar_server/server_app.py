"""OSCAR's Flower ServerApp: build the config, run the one-shot strategy, write the report."""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from oscar_common.logs import setup_logging
from oscar_common.config import OscarConfig
from oscar_server.report import client_table, write_report
from oscar_server.run_dir import RunDirectory
from oscar_server.strategy import OscarStrategy, RunState

log = logging.getLogger("oscar.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = OscarConfig.from_run_config(context.run_config)
    run_dir = RunDirectory.for_run(cfg, context.run_id)
    run_dir.save_config(cfg)
    started = time.monotonic()
    strategy: OscarStrategy | None = None
    try:
        strategy = OscarStrategy(cfg, run_dir)
        state = strategy.start(grid)
    except Exception as exc:
        # Whatever happened, leave a report that says how far the run got and why it stopped.
        state = strategy.state if strategy is not None else RunState()
        state.timings["total"] = time.monotonic() - started
        write_report(cfg, run_dir, state, status="failed", error=f"{type(exc).__name__}: {exc}")
        log.error("OSCAR run failed: %s (report: %s)", exc, run_dir.report_json)
        raise
    state.timings["total"] = time.monotonic() - started
    report = write_report(cfg, run_dir, state, status="completed")
    log.info("OSCAR run completed in %.1fs\n%s", state.timings["total"], client_table(report))
    log.info("report: %s | %s | %s", run_dir.report_json, run_dir.report_md, run_dir.samples_png)
