"""Shared by the end-to-end tests (not a test module): run settings and the federation environment."""

from __future__ import annotations

from pathlib import Path

from oscar_demo.tiny import offline_hub_env

# Small enough for 2 CPU cores, large enough that every stage does real work.
FAST = {"images-per-class": 2, "num-inference-steps": 10, "inversion-steps": 40, "epochs": 1, "min-clients": 2,
        "min-images-per-class": 2}


def hub_env(tiny_hub: Path) -> dict[str, str]:
    """Environment of every Flower process: the tiny models' cache, never the network, and one thread
    each (a server and several clients share 2 cores; more threads only make them wait on each other)."""
    return {**offline_hub_env(tiny_hub), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
