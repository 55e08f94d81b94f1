"""A federation started by a process that is then killed outright leaves nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from oscar_demo.federation import is_running, wait_until
from oscar_demo.watchdog import MARKER_VARIABLE, marked_processes

PROJECT = Path(__file__).resolve().parents[2]
STARTER = textwrap.dedent("""
    import os, subprocess, sys, time
    from oscar_demo.watchdog import MARKER_VARIABLE, Watchdog
    marker = sys.argv[1]
    watchdog = Watchdog(marker)
    # a detached grandchild, as Flower starts its app processes: only the marker finds it
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"],
                                  start_new_session=True, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, MARKER_VARIABLE: marker})
    # Popen returns once exec began, which can be before /proc shows the new environment: wait for its word
    grandchild.stdout.readline()
    if sys.argv[2] == "stop":
        watchdog.stop()
    print("ready", flush=True)
    time.sleep(300)
""")


def _start(marker: str, mode: str) -> subprocess.Popen:
    starter = subprocess.Popen([sys.executable, "-c", STARTER, marker, mode], cwd=PROJECT, stdout=subprocess.PIPE,
                               text=True, env={k: v for k, v in os.environ.items() if k != MARKER_VARIABLE})
    assert starter.stdout.readline().strip() == "ready"
    return starter


def test_a_killed_starter_takes_its_federation_with_it() -> None:
    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    starter = _start(marker, "watch")
    assert len(marked_processes(marker)) == 1
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    wait_until(lambda: not marked_processes(marker), "the detached process to be killed", 20)


def test_a_watchdog_that_stood_down_touches_nothing() -> None:
    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    starter = _start(marker, "stop")
    try:
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        time.sleep(1)
        (survivor,) = marked_processes(marker)
    finally:
        for pid in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)


# A marked process in a session of its own (as Flower's superexec) starts one whose environment does not show
# the marker (Ray's retitled agents) and that ignores SIGTERM; then the marked one exits, leaving it to init.
SESSION_STARTER = textwrap.dedent("""
    import os, subprocess, sys, time
    from oscar_demo.watchdog import MARKER_VARIABLE, Watchdog
    marker = sys.argv[1]
    watchdog = Watchdog(marker)
    agent = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
             "time.sleep(300)")
    parent = ("import os, subprocess, sys, time; "
              "env = {k: v for k, v in os.environ.items() if k != %r}; "
              "agent = subprocess.Popen([sys.executable, '-c', %r], env=env, stdout=subprocess.PIPE, text=True); "
              "agent.stdout.readline(); print(agent.pid, flush=True); time.sleep(300)") % (MARKER_VARIABLE, agent)
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, MARKER_VARIABLE: marker})
    print(proc.pid, proc.stdout.readline().strip(), flush=True)
    time.sleep(300)
""")


def test_the_watchdog_also_kills_what_the_marker_misses_in_a_marked_session() -> None:
    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    starter = subprocess.Popen([sys.executable, "-c", SESSION_STARTER, marker], cwd=PROJECT, stdout=subprocess.PIPE,
                               text=True, env={k: v for k, v in os.environ.items() if k != MARKER_VARIABLE})
    parent, agent = (int(pid) for pid in starter.stdout.readline().split())
    try:
        assert marked_processes(marker) == {parent}  # the agent is invisible to the marker
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        wait_until(lambda: not is_running(parent) and not is_running(agent), "both to be killed", 20)
    finally:
        for pid in (parent, agent):
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
