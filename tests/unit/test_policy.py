"""A client's own choices: it can be stricter than the server, never looser."""

from __future__ import annotations

import pytest

from oscar_client.policy import ClientPolicy
from oscar_common.config import OscarConfig


def test_the_client_can_raise_the_minimum_and_lower_epsilon_never_the_reverse() -> None:
    strict_server = OscarConfig(class_names=("a",), min_images_per_class=10, dp_max_epsilon=4,
                                share_counts=True).train_instruction()
    lax_server = OscarConfig(class_names=("a",), min_images_per_class=10).train_instruction()
    client = ClientPolicy.from_node_config({"min-images-per-class": 20, "dp-epsilon": 2, "share-counts": "false"})
    assert client.min_images(strict_server) == 20 and client.epsilon(strict_server) == 2
    assert not client.shares_counts(strict_server)
    greedy = ClientPolicy.from_node_config({"min-images-per-class": 3, "dp-epsilon": 8})
    assert greedy.min_images(strict_server) == 10 and greedy.epsilon(strict_server) == 4
    assert ClientPolicy().epsilon(strict_server) == 4  # the server requires DP: the client applies it
    assert ClientPolicy().epsilon(lax_server) == 0 and ClientPolicy().shares_counts(strict_server)


@pytest.mark.parametrize("node_config, message", [
    ({"dp-delta": 2}, "dp-delta must be in"),
    ({"caption-cache": "sometimes"}, "caption-cache must be true or false"),
    ({"dp-epsilon": -1}, "must be >= 0"),
    ({"min-images-per-class": "ten"}, "node config: min-images-per-class must be a number"),
    ({"loader-workers": 1.5}, "node config: loader-workers must be a number"),
    ({"dp-clip-norm": "wide"}, "node config: dp-clip-norm must be a number"),
    ({"dp-clip-norm": 0}, "node config: dp-clip-norm must be a finite number > 0, got 0"),
    ({"dp-budget": -1}, "node config: dp-budget must be >= 0"),  # names the one key that is wrong
])
def test_bad_node_config_is_named(node_config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientPolicy.from_node_config(node_config)


def test_node_config_flags_read_as_the_run_config_reads_them() -> None:
    # --node-config values arrive as TOML: bools, or strings and numbers where a user typed them so
    for value, expected in [(True, True), ("no", False), ("YES", True), (0, False), ("1", True)]:
        assert ClientPolicy.from_node_config({"caption-cache": value}).caption_cache is expected
        assert OscarConfig.from_run_config({"class-names": "a", "share-counts": value}).share_counts is expected


def test_the_clip_norm_defaults_to_1_for_pooled_and_must_be_chosen_for_tokens() -> None:
    pooled = OscarConfig(class_names=("a",)).train_instruction()
    tokens = OscarConfig(class_names=("a",), scheme="tokens").train_instruction()
    assert ClientPolicy.from_node_config({}).clip_norm(pooled) == 1.0  # unit vectors: clips nothing
    with pytest.raises(ValueError, match="node config: dp-clip-norm is not set.*scheme 'tokens'"):
        ClientPolicy.from_node_config({"dp-epsilon": 2}).clip_norm(tokens)
    assert ClientPolicy.from_node_config({"dp-clip-norm": 1.0}).clip_norm(tokens) == 1.0  # said explicitly: taken
    assert ClientPolicy.from_node_config({"dp-clip-norm": 40}).clip_norm(tokens) == 40.0
    assert ClientPolicy.from_node_config({"dp-budget": 8}).dp_budget == 8.0
