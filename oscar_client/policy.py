"""What a client is willing to share, and how: its own node config, which the server cannot override.

    flower-supernode ... --node-config "data-dir='/data/clipart' dp-epsilon=4 min-images-per-class=20"

The keys (``min-images-per-class``, ``share-counts``, ``dp-epsilon``, ``dp-delta``, ``dp-clip-norm``,
``dp-budget``, ``caption-cache``, ``require-preview-approval``, ``loader-workers``) are declared in
:class:`oscar_common.node_config.PrivacyKeys`; docs/configuration.md lists them with their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from oscar_common.node_config import PrivacyKeys
from oscar_common.wire import TrainInstruction


@dataclass(frozen=True)
class ClientPolicy(PrivacyKeys):
    """The node config's privacy keys, and how they combine with what the server asks."""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "ClientPolicy":
        return cls.from_values(node_config)

    def min_images(self, instruction: TrainInstruction) -> int:
        """The stricter of the server's and this client's minimum."""
        return max(instruction.min_images_per_class, self.min_images_per_class)

    def epsilon(self, instruction: TrainInstruction) -> float:
        """0 (no DP), or the smaller of the client's choice and the server's maximum."""
        if instruction.dp_max_epsilon > 0:
            return min(self.dp_epsilon, instruction.dp_max_epsilon) if self.dp_epsilon > 0 else instruction.dp_max_epsilon
        return self.dp_epsilon

    def clip_norm(self, instruction: TrainInstruction) -> float:
        """The clip norm C of a DP release: the node config's, else 1 for ``pooled`` (unit vectors).

        ``tokens`` has no safe default: a caption's departure from the empty prompt is far longer than 1, so
        C = 1 would shrink every caption to a unit vector and the noise (sigma times ~243 in norm for
        77 x 768) would drown it.
        """
        if self.dp_clip_norm is not None:
            return self.dp_clip_norm
        if instruction.scheme == "tokens":
            raise ValueError(
                "node config: dp-clip-norm is not set, and this run uses differential privacy with scheme 'tokens': "
                "the default 1.0 is for pooled (unit) embeddings and would shrink each caption's departure from "
                "the empty prompt to nothing. Set dp-clip-norm to the typical departure norm of public captions "
                "through the same encoder (`python -m oscar_client.clip_norm`, docs/privacy.md)")
        return 1.0

    def shares_counts(self, instruction: TrainInstruction) -> bool:
        return instruction.share_counts and self.share_counts
