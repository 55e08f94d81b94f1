"""The client benchmark section runs end to end (on the tiny BLIP) and never needs flwr or diffusers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from oscar_bench.client import bench_client, blip_base_config


def test_bench_client_on_the_tiny_model() -> None:
    result = bench_client(tiny=True, device=torch.device("cpu"), images=10, budget_seconds=1e6, batch_size=4,
                          repeats=2)
    assert result["images"] == 8 and result["batch_size"] == 4  # cut to whole batches
    assert result["dtype"] == "float32" and result["max_new_tokens"] == 30
    assert result["captioned_first_run"] == 8 and result["captioned_second_run"] == 0  # the cache answered
    assert result["pipeline_img_per_s"] > 0 and result["bare_generate_img_per_s"] > 0
    ratio = result["pipeline_img_per_s"] / result["bare_generate_img_per_s"]
    assert result["pipeline_vs_bare"] == pytest.approx(ratio, rel=1e-2)
    assert len(result["pipeline_s"]) == len(result["bare_generate_s"]) == 2  # alternated, medians reported
    # start-up and steady state apart: the first batch comes within each pass, the rest at the steady rate
    assert all(0 < first < whole for first, whole in zip(result["pipeline_first_batch_s"], result["pipeline_s"]))
    assert result["pipeline_steady_img_per_s"] > 0
    steady_ratio = result["pipeline_steady_img_per_s"] / result["bare_generate_img_per_s"]
    assert result["pipeline_steady_vs_bare"] == pytest.approx(steady_ratio, rel=1e-2)
    # a client's start: the model loaded from disk, the first batch captioned after it
    assert result["startup_model_load_s"] > 0 and result["startup_first_batch_after_load_s"] > 0
    assert 0 <= result["startup_wait_for_images_s"] <= result["startup_first_batch_after_load_s"]
    # no time at all: still one whole batch, timed once
    hurried = bench_client(tiny=True, device=torch.device("cpu"), images=10, budget_seconds=0, batch_size=4,
                           repeats=1)
    assert hurried["images"] == 4 and len(hurried["pipeline_s"]) == 1


def test_blip_base_config_is_the_published_architecture() -> None:
    config = blip_base_config()
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (384, 16)  # ViT-B/16 at 384
    assert config.vision_config.hidden_size == 768 and config.vision_config.num_hidden_layers == 12
    text = config.text_config  # BERT-base decoder
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (30524, 768, 12, 12)
    assert (text.bos_token_id, text.sep_token_id, text.pad_token_id) == (30522, 102, 0)


def test_the_bench_imports_without_flwr_or_diffusers() -> None:
    # The GPU machine has neither: the section must import with both missing.
    code = "import sys; sys.modules['flwr'] = None; sys.modules['diffusers'] = None; import oscar_bench.client"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
