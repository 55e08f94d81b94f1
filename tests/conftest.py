"""Shared fixtures: tiny random-weight models under their real hub ids, and the demo's real images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oscar_demo.demo_data import make_demo_data
from oscar_demo.tiny import install_tiny_models


# Two cores run the suite, two workers at a time (pytest -n 2) plus the Flower processes of the end-to-end
# tests: one thread each. Tiny models gain nothing from more, and oversubscribed threads wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding the tiny BLIP, CLIP and Stable Diffusion under the default ids."""
    cache = tmp_path_factory.mktemp("hf-cache")
    install_tiny_models(cache)
    return cache


@pytest.fixture(scope="session")
def demo_clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three clients (plain, textured, inverted-noisy) of real MNIST digits, 6 per class each."""
    return make_demo_data(tmp_path_factory.mktemp("demo-data"), per_class=6, seed=0)
