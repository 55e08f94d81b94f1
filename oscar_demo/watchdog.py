"""Clean up after a local federation even when whoever started it is killed outright.

A federation on one machine is a tree of processes, some of which Flower detaches into sessions of their
own, plus, for the network-namespace demo, namespaces. ``with`` blocks stop all of it on any exception or
Ctrl-C, but not when the starting process is killed (SIGKILL, a CI timeout). So each federation starts a
small watchdog process: Linux sends it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and it then
kills every process whose environment carries the federation's marker (all of them: the marker is an
environment variable they inherit) and deletes the namespaces with the federation's prefix. A federation
that stops normally stops its watchdog, which then does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def kill_marked(marker: str, netns_prefix: str = "") -> None:
    """SIGTERM, then SIGKILL, every marked process; delete the namespaces named ``<prefix>-*``."""
    for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        pids = marked_processes(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + pause
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = marked_processes(marker)
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


def _main(marker: str, netns_prefix: str) -> None:
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))  # stand down
    signal.signal(signal.SIGTERM, lambda *_: (kill_marked(marker, netns_prefix), sys.exit(0)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the with-blocks clean up
    if os.getppid() == 1:  # the parent died before the handlers were in place
        kill_marked(marker, netns_prefix)
        return
    print("ready", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
