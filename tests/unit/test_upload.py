"""What a client's upload holds under each policy, built the one way the ClientApp and oscar-preview build it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from oscar_client import client_app
from oscar_client.policy import ClientPolicy
from oscar_client.preview import PreviewRequired, build_preview, check_preview_approval
from oscar_client.privacy import clipped_mean, gaussian_sigma
from oscar_client.upload import prepare_upload, record_release
from oscar_common.config import OscarConfig
from oscar_common.models.text_encoding import encode_tokens
from oscar_common.node_settings import NodeSettings
from oscar_common.wire import FAILURE_KEY, UPLOAD_ARRAYS_KEY, UPLOAD_META_KEY, train_content, upload_content
from oscar_demo.demo_data import DIGIT_NAMES


@pytest.fixture
def node(tmp_path: Path, demo_clients: dict[str, Path], tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> NodeSettings:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return NodeSettings.from_context({"data-dir": str(demo_clients["plain"]), "output-dir": str(tmp_path / "out"),
                                      "device": "cpu"}, {})


def _instruction(**overrides):
    return OscarConfig(**{"class_names": DIGIT_NAMES, "min_images_per_class": 2, **overrides}).train_instruction()


def test_the_default_message_carries_ids_and_means_only(node: NodeSettings) -> None:
    prepared = prepare_upload(node, _instruction(share_counts=True), ClientPolicy(share_counts=False))
    content = recorddict_from_proto(recorddict_to_proto(upload_content(prepared.upload)))
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


def test_dp_with_prototypes_is_refused_by_the_client_before_any_captioning(node: NodeSettings) -> None:
    instruction = _instruction(prototypes_per_class=2)  # a server that does not require DP may ask for k = 2
    with pytest.raises(ValueError, match=r"differential privacy cannot be combined with prototypes-per-class > 1"):
        prepare_upload(node, instruction, ClientPolicy(dp_epsilon=1.0))
    assert not (node.output_dir / "caption-cache").exists()  # refused before any image was captioned


def test_dp_tokens_without_an_explicit_clip_norm_is_refused_before_any_captioning(node: NodeSettings) -> None:
    # DP from the client's own epsilon, or from the server's dp-max-epsilon: either way C = 1 would be wrong
    for policy, server_epsilon in ((ClientPolicy(dp_epsilon=4.0), 0.0), (ClientPolicy(), 4.0)):
        with pytest.raises(ValueError, match=r"node config: dp-clip-norm is not set, and this run uses differential "
                                             r"privacy with scheme 'tokens'.*python -m oscar_client.clip_norm"):
            prepare_upload(node, _instruction(scheme="tokens", dp_max_epsilon=server_epsilon), policy)
    assert not (node.output_dir / "caption-cache").exists()


def _client_app_upload(node: NodeSettings, instruction, node_config: dict, monkeypatch: pytest.MonkeyPatch):
    """What the ClientApp replies to a train message, with this node config."""
    for field in ("_run_id", "_node_id", "_task_id"):  # what a Flower process has, for creating messages
        monkeypatch.setattr(TaskIdentity, field, 1)
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=60, message_type="train")
    message = Message(metadata=metadata, content=train_content(instruction))
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(node.data_dir), "output-dir": str(node.output_dir),
                                   "device": "cpu", **node_config})
    return client_app.train(message, context).content


def test_the_ledger_counts_each_release_once_and_refuses_one_past_the_budget(
        node: NodeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    node_config = {"dp-epsilon": 1.0, "dp-budget": 1.5}
    ledger = node.output_dir / "privacy" / "ledger.json"

    def upload(**overrides) -> float:
        """The noise multiplier sigma / sensitivity of the release the ClientApp sends."""
        content = _client_app_upload(node, _instruction(**overrides), node_config, monkeypatch)
        assert FAILURE_KEY not in content.config_records, content.config_records.get(FAILURE_KEY)
        meta = content.config_records[UPLOAD_META_KEY]
        return meta["dp-sigma"] / meta["dp-sensitivity"]

    first = upload()  # n_pub 2
    upload()  # the same data, key and parameters: the same noise, not a new release
    assert len(json.loads(ledger.read_text())["releases"]) == 1
    summary = json.loads((node.output_dir / "upload-summary.json").read_text())["privacy_ledger"]
    assert summary["releases_before"] == 1 and summary["this_release"].startswith("a repeat")
    assert summary["epsilon_after"] == pytest.approx(1.0, rel=1e-9) and summary["budget"] == 1.5

    second = upload(min_images_per_class=3)  # the server changed min-images-per-class: fresh noise, same images
    written = json.loads(ledger.read_text())
    assert len(written["releases"]) == 2
    z = (first ** -2 + second ** -2) ** -0.5  # Gaussians compose into one Gaussian (test_ledger.py)
    assert written["total"]["epsilon"] == pytest.approx(dp_accounting.get_epsilon_gaussian(z, 1e-5), rel=1e-5)
    assert 1.0 < written["total"]["epsilon"] < 1.5

    refused = _client_app_upload(node, _instruction(seed=1), node_config, monkeypatch)  # a new split: a third
    reason = refused.config_records[FAILURE_KEY]["reason"]
    assert reason.startswith("ValueError: node config dp-budget=1.5 (at dp-delta 1e-05) refuses this release: "
                             f"2 earlier releases add up to epsilon {written['total']['epsilon']:.4g}, and this one "
                             "(epsilon 1) brings the total to ")
    assert len(json.loads(ledger.read_text())["releases"]) == 2  # a refused release is not recorded


def test_the_noise_key_is_private_to_its_owner_and_rotating_it_makes_a_new_release(node: NodeSettings) -> None:
    policy = ClientPolicy(dp_epsilon=2.0)
    before = prepare_upload(node, _instruction(), policy)
    key = node.output_dir / "privacy" / "noise.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    record_release(node, before, policy)
    key.unlink()  # rotation: a new key is made on the next upload
    after = prepare_upload(node, _instruction(), policy)
    assert not np.allclose(after.upload.means, before.upload.means)  # fresh noise on the same data...
    assert after.local_summary["privacy_ledger"]["this_release"] == "new"  # ...counted as a new release
    assert after.local_summary["privacy_ledger"]["epsilon_after"] > 2.0


def test_the_preview_shows_the_ledger_and_is_not_a_release(node: NodeSettings) -> None:
    policy = ClientPolicy(dp_epsilon=2.0, dp_budget=5.0)
    record_release(node, prepare_upload(node, _instruction(), policy), policy)  # one earlier release
    result = build_preview(node, _instruction(seed=1), policy, inversion_tokens=2, inversion_steps=1,
                           inversion_lr=0.1, prompt_template="{class_name}, {prompt}", images_per_class=0,
                           guidance_scale=7.5, num_inference_steps=1, diffusion_model=None)
    shown = result["privacy_ledger"]
    assert (shown["releases_before"], shown["this_release"], shown["budget"]) == (1, "new", 5.0)
    assert shown["epsilon_before"] == pytest.approx(2.0, rel=1e-9) and 2.0 < shown["epsilon_after"] < 4.0
    markdown = (node.output_dir / "preview" / "preview.md").read_text()
    assert (f"1 earlier releases of this data, composed epsilon 2; this upload is new and makes it "
            f"{shown['epsilon_after']:.4g} (at delta 1e-05, budget 5)") in markdown
    ledger = json.loads((node.output_dir / "privacy" / "ledger.json").read_text())
    assert len(ledger["releases"]) == 1  # the preview released nothing
