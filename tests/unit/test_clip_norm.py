"""``python -m oscar_client.clip_norm``: departure norms of public captions, the vector DP clips under tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oscar_client.clip_norm import departure_norms, main
from oscar_common.config import OscarConfig
from oscar_common.models.loading import load_diffusion_text_encoder
from oscar_common.models.text_encoding import encode_tokens

CAPTIONS = ["a photo of a cat", "a dog running on the beach", "a red car parked next to a tree", "two birds"]


@pytest.fixture
def sd_id(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return OscarConfig().diffusion_model


def test_departure_norms_measure_each_caption_against_the_empty_prompt(sd_id: str) -> None:
    norms = departure_norms(CAPTIONS, sd_id, torch.device("cpu"))
    tokenizer, text_encoder = load_diffusion_text_encoder(sd_id, torch.device("cpu"), torch.float32)
    states = encode_tokens(CAPTIONS + [""], tokenizer, text_encoder).numpy().astype(np.float64)
    expected = np.linalg.norm((states[:-1] - states[-1]).reshape(len(CAPTIONS), -1), axis=1)
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    assert norms.shape == (4,) and np.all(norms > 0)
    with pytest.raises(ValueError, match="no captions"):
        departure_norms([], sd_id, torch.device("cpu"))


def test_the_command_prints_quantiles_and_suggests_the_median(sd_id: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    captions = tmp_path / "public.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n\n")
    assert main(["--encoder", sd_id, "--captions", str(captions), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    median = np.median(departure_norms(CAPTIONS, sd_id, torch.device("cpu")))
    assert "departure norms of 4 public captions" in out and " 50%: " in out
    assert out.rstrip().endswith(f"suggested: dp-clip-norm={median:.4g} (the median)")
