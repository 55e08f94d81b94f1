"""``oscar-class-names``: print a benchmark's class list for the server's ``class-names`` run config.

    oscar-class-names --benchmark domainnet --root /data/domainnet --subset oscar90
    oscar-class-names --benchmark domainnet --root /data/domainnet --subset oscar90 --toml >> run.toml
    oscar-class-names --benchmark nico-unique --root /data/NICOpp --clients
"""

from __future__ import annotations

import argparse
import json
import sys

from oscar_common.data.datasets import BENCHMARKS, BenchmarkError, benchmark_class_names, benchmark_clients


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a benchmark's class names (comma-separated).")
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--root", required=True, help="the benchmark's folder (benchmark-root)")
    parser.add_argument("--subset", default="", help="all (default), oscar90, fedcado90 (DomainNet), "
                        "label ranges such as 0-29,40-89, or class names")
    parser.add_argument("--split-dir", help="folder of the official split files, if not the default")
    parser.add_argument("--num-clients", type=int, help="label-skew: number of clients")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--toml", action="store_true", help="print a run-config line: class-names = \"...\"")
    output.add_argument("--clients", action="store_true", help="print the client names instead, one a line")
    args = parser.parse_args(argv)
    options = {"split_dir": args.split_dir, "num_clients": args.num_clients}
    try:
        if args.clients:
            print("\n".join(benchmark_clients(args.benchmark, args.root, **options)))
            return
        names = ",".join(benchmark_class_names(args.benchmark, args.root, args.subset, **options))
    except BenchmarkError as exc:
        sys.exit(f"oscar-class-names: {exc}")
    # json.dumps quotes a TOML basic string correctly (same escapes for these characters).
    print(f"class-names = {json.dumps(names)}" if args.toml else names)


if __name__ == "__main__":
    main()
