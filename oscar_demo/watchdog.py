"""Clean up after a local federation even when whoever started it is killed outright.

A federation on one machine is a tree of processes, some of which Flower detaches into sessions of their
own, plus, for the network-namespace demo, namespaces. ``with`` blocks stop all of it on any exception or
Ctrl-C, but not when the starting process is killed (SIGKILL, a CI timeout). So each federation starts a
small watchdog process: Linux sends it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and it then
kills every process whose environment carries the federation's marker (all of them: the marker is an
environment variable they inherit) and deletes the namespaces with the federation's prefix. A federation
that stops normally stops its watchdog, which then does nothing.

The marker alone misses some: Ray retitles its processes (setproctitle), which can overwrite the environment
/proc shows, and its agents ignore SIGTERM. Every process of a federation is in a session one of its marked
processes is in (Flower's detached processes start sessions of their own, Ray's inherit theirs), so the
sessions of the marked processes are swept too, until nothing of them is left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

MARKER_VARIABLE = "OSCAR_FEDERATION_ID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """For ``preexec_fn``: the child gets ``sig`` when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:  # not Linux: the with-block cleanup still applies
        pass


def marked_processes(marker: str) -> set[int]:
    """PIDs (other than this one) whose environment holds ``OSCAR_FEDERATION_ID=<marker>``."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def process_stat(pid: int) -> tuple[int, int, str] | None:
    """(parent PID, session id, state letter) of a process from /proc/<pid>/stat; None once it is gone."""
    try:
        # the command name (field 2) may hold spaces and parentheses; the fields after its last ')' do not
        state, ppid, _pgrp, session = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:4]
        return int(ppid), int(session), state
    except (OSError, IndexError, ValueError):
        return None


def session_members(sessions: set[int]) -> set[int]:
    """Live (not zombie) PIDs, other than this one, whose session is one of ``sessions``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            stat = process_stat(int(entry.name))
            if stat is not None and stat[1] in sessions and stat[2] != "Z":
                found.add(int(entry.name))
    return found


def signal_pids(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_marked(marker: str, netns_prefix: str = "", grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every marked process and every process in their sessions (never this process's
    own session); delete the namespaces named ``<prefix>-*``.

    Each phase lasts until nothing is left or ``grace`` seconds passed, looking again every 0.1 s: a process
    started meanwhile (Ray starts some while it is being stopped) is signalled too.
    """
    own_session = os.getsid(0)
    sessions: set[int] = set()

    def targets() -> set[int]:
        marked = marked_processes(marker)
        sessions.update(stat[1] for stat in map(process_stat, marked) if stat is not None and stat[1] != own_session)
        return marked | session_members(sessions)

    terminated: set[int] = set()  # SIGTERM once each: a second one can cut a clean shutdown short
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        while (pids := targets()) and time.monotonic() < deadline:
            signal_pids(pids - terminated if sig == signal.SIGTERM else pids, sig)
            terminated |= pids
            time.sleep(0.1)
    if netns_prefix:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in listed:
            if name.startswith(f"{netns_prefix}-"):
                subprocess.run(["ip", "netns", "delete", name], capture_output=True)


class Watchdog:
    """Start with the federation (``marker`` in every federation process's environment); ``stop()`` when the
    federation has been stopped normally."""

    def __init__(self, marker: str, netns_prefix: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oscar_demo.watchdog", marker, netns_prefix],
            preexec_fn=die_with_parent, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != MARKER_VARIABLE},  # never its own target
            cwd=Path(__file__).resolve().parents[1],
        )
        # Until its handlers are installed, a SIGTERM would just kill it: wait for its word.
        if self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the federation watchdog did not start")

    def stop(self) -> None:
        """The federation is down: stand down without touching anything."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


def serve(cleanup: Callable[[], None]) -> None:
    """A watchdog process's life: ``cleanup`` on SIGTERM (sent when the parent dies, :func:`die_with_parent`),
    stand down on SIGUSR1, print "ready" once the handlers are in place."""
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))  # stand down
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(0)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the with-blocks clean up
    if os.getppid() == 1:  # the parent died before the handlers were in place
        cleanup()
        return
    print("ready", flush=True)
    while True:
        signal.pause()


def _main(marker: str, netns_prefix: str) -> None:
    serve(lambda: kill_marked(marker, netns_prefix))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
