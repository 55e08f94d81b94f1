"""What a client's upload holds under each policy, built the one way the ClientApp and oscar-preview build it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from oscar_client.policy import ClientPolicy
from oscar_client.preview import PreviewRequired, check_preview_approval
from oscar_client.privacy import clipped_mean, gaussian_sigma
from oscar_client.upload import prepare_upload
from oscar_common.config import OscarConfig
from oscar_common.node_settings import NodeSettings
from oscar_common.text_encoding import encode_tokens
from oscar_common.wire import UPLOAD_ARRAYS_KEY, UPLOAD_META_KEY
from oscar_demo.demo_data import DIGIT_NAMES


@pytest.fixture
def node(tmp_path: Path, demo_clients: dict[str, Path], tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> NodeSettings:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return NodeSettings.from_context({"data-dir": str(demo_clients["plain"]), "output-dir": str(tmp_path / "out"),
                                      "device": "cpu"}, {})


def _instruction(**overrides):
    return OscarConfig(class_names=DIGIT_NAMES, min_images_per_class=2, **overrides).train_instruction()


def test_the_default_message_carries_ids_and_means_only(node: NodeSettings) -> None:
    prepared = prepare_upload(node, _instruction(share_counts=True), ClientPolicy(share_counts=False))
    content = recorddict_from_proto(recorddict_to_proto(prepared.upload.to_record()))
    assert sorted(content.array_records[UPLOAD_ARRAYS_KEY].keys()) == ["class_ids", "means"]
    meta = dict(content.config_records[UPLOAD_META_KEY].items())
    assert not {"num-images", "unreadable-images", "skipped-classes"} & set(meta)
    assert prepared.local_summary["images_per_class"] == {name: 5 for name in DIGIT_NAMES}  # kept at home


def test_counts_travel_when_the_run_asks_and_the_client_agrees(node: NodeSettings) -> None:
    upload = prepare_upload(node, _instruction(share_counts=True), ClientPolicy()).upload
    assert upload.counts.tolist() == [5] * 10 and upload.shared.num_images == 50


def test_a_client_minimum_above_the_class_sizes_keeps_every_class_home(node: NodeSettings) -> None:
    with pytest.raises(ValueError, match="no class has 6 training images"):
        prepare_upload(node, _instruction(), ClientPolicy(min_images_per_class=6))


def test_dp_means_are_noisy_with_the_stated_sigma_and_a_repeat_costs_nothing(node: NodeSettings) -> None:
    plain = prepare_upload(node, _instruction(), ClientPolicy()).upload
    policy = ClientPolicy(dp_epsilon=2.0, dp_delta=1e-5)
    first = prepare_upload(node, _instruction(), policy)
    again = prepare_upload(node, _instruction(), policy)  # captions from the cache: the same release
    dp = first.upload.dp
    assert (dp.epsilon, dp.min_images) == (2.0, 2) and dp.sigma == pytest.approx(gaussian_sigma(2.0, 1e-5, 2 / 2))
    np.testing.assert_array_equal(first.upload.means, again.upload.means)
    assert first.digest == again.digest
    noise = first.upload.means - plain.means
    assert np.std(noise) == pytest.approx(dp.sigma, rel=0.1)
    assert again.local_summary["captioned"] == 0 and again.local_summary["captions_from_cache"] == 50


def test_dp_tokens_clip_around_the_empty_prompt_with_one_text_encoder_load(node: NodeSettings,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from oscar_client import encoder as encoder_module

    loads = []
    load = encoder_module.load_diffusion_text_encoder
    monkeypatch.setattr(encoder_module, "load_diffusion_text_encoder",
                        lambda *args, **kwargs: loads.append(args[0]) or load(*args, **kwargs))
    instruction = _instruction(scheme="tokens")
    plain = prepare_upload(node, instruction, ClientPolicy())
    released = prepare_upload(node, instruction, ClientPolicy(dp_epsilon=4.0, dp_clip_norm=2.0))
    assert loads == [instruction.encoder_id] * 2  # one load per upload: captions, then the empty prompt

    # the centre is the empty prompt's states, computed by the same encoder
    tokenizer, text_encoder = load(instruction.encoder_id, torch.device("cpu"), torch.float32)
    empty = encode_tokens([""], tokenizer, text_encoder)[0].numpy()
    np.testing.assert_array_equal(released.encoded.empty_prompt, empty)
    assert plain.encoded.empty_prompt.shape == plain.upload.means.shape[1:]

    # the release: the clipped means around it, plus noise of the stated sigma
    dp = released.upload.dp
    by_class = [released.encoded.embeddings[released.encoded.labels == c] for c in released.upload.class_ids]
    clipped = np.stack([clipped_mean(x, clip_norm=2.0, center=empty) for x in by_class])
    noise = released.upload.means - clipped
    assert dp.sigma == pytest.approx(gaussian_sigma(4.0, 1e-5, 2 * 2.0 / 2))
    assert np.std(noise) == pytest.approx(dp.sigma, rel=0.1) and abs(np.mean(noise)) < 0.05 * dp.sigma


def test_prototypes_give_up_to_k_rows_per_class(node: NodeSettings) -> None:
    upload = prepare_upload(node, _instruction(prototypes_per_class=2), ClientPolicy()).upload
    _, rows = np.unique(upload.class_ids, return_counts=True)
    assert rows.max() == 2 and upload.prototypes_per_class == 2  # 5 images, minimum 2: two clusters fit


def test_an_upload_waits_for_a_preview_of_this_very_data(node: NodeSettings) -> None:
    instruction = _instruction()
    prepared = prepare_upload(node, instruction, ClientPolicy(require_preview_approval=True))
    with pytest.raises(PreviewRequired, match="there is no preview yet.*oscar-preview"):
        check_preview_approval(node, instruction, prepared.digest)
    saved = json.loads((node.output_dir / "preview" / "instruction.json").read_text())
    assert saved["class-names"] == list(DIGIT_NAMES)
    (node.output_dir / "preview" / "preview.json").write_text(json.dumps({"upload_digest": prepared.digest}))
    check_preview_approval(node, instruction, prepared.digest)  # approved
    other = prepare_upload(node, _instruction(seed=1), ClientPolicy())
    with pytest.raises(PreviewRequired, match="the preview shows other data or settings"):
        check_preview_approval(node, _instruction(seed=1), other.digest)
