"""What a client is willing to share, and how: its own node config, which the server cannot override.

    flower-supernode ... --node-config "data-dir='/data/clipart' dp-epsilon=4 min-images-per-class=20"

| key | default | meaning |
|---|---|---|
| ``min-images-per-class`` | the server's | classes with fewer training images stay home; can raise the server's minimum, never lower it |
| ``share-counts`` | ``true`` | ``false`` refuses to send label counts even when the run asks for them (``share-counts``) |
| ``dp-epsilon`` | ``0`` (off) | differential privacy on the means with this epsilon; the server may require at most some epsilon, and the client uses the smaller of the two |
| ``dp-delta`` | ``1e-5`` | the delta of (epsilon, delta)-DP |
| ``dp-clip-norm`` | ``1.0`` (``pooled``) | each caption embedding (``tokens``: its departure from the empty prompt's) is clipped to this L2 norm; CLIP's pooled embeddings are unit vectors, so 1 clips nothing. ``tokens`` with DP has no default: choose it from public data (docs/privacy.md) |
| ``dp-budget`` | ``0`` (none) | refuse a release that would take this data dir's composed epsilon (``<output-dir>/privacy/ledger.json``) past this |
| ``caption-cache`` | ``true`` | reuse captions of unchanged images from ``<output-dir>/caption-cache`` |
| ``require-preview-approval`` | ``false`` | refuse to upload until ``oscar-preview`` has shown this very upload (docs/privacy.md) |
| ``loader-workers`` | ``-1`` (auto) | DataLoader workers that decode images while the captioner runs |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from oscar_common.config_values import parse_bool, parse_number
from oscar_common.wire import TrainInstruction


@dataclass(frozen=True)
class ClientPolicy:
    min_images_per_class: int = 0  # 0: the server's
    share_counts: bool = True
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_clip_norm: float | None = None  # None: not set (1.0 for pooled; tokens + DP refuses, see clip_norm)
    dp_budget: float = 0.0  # 0: no limit on the ledger's composed epsilon
    caption_cache: bool = True
    require_preview_approval: bool = False
    loader_workers: int = -1

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "ClientPolicy":
        def flag(key: str, default: bool) -> bool:
            return parse_bool(node_config.get(key, default), f"node config: {key}")

        def number(key: str, kind: type, default: int | float) -> Any:
            return parse_number(node_config.get(key, default), kind, f"node config: {key}")

        policy = cls(
            min_images_per_class=number("min-images-per-class", int, 0),
            share_counts=flag("share-counts", True),
            dp_epsilon=number("dp-epsilon", float, 0.0),
            dp_delta=number("dp-delta", float, 1e-5),
            dp_clip_norm=number("dp-clip-norm", float, 0.0) if "dp-clip-norm" in node_config else None,
            dp_budget=number("dp-budget", float, 0.0),
            caption_cache=flag("caption-cache", True),
            require_preview_approval=flag("require-preview-approval", False),
            loader_workers=number("loader-workers", int, -1),
        )
        if policy.min_images_per_class < 0 or policy.dp_epsilon < 0 or policy.dp_budget < 0:
            raise ValueError("node config: min-images-per-class, dp-epsilon and dp-budget must be >= 0")
        if policy.dp_clip_norm is not None and not 0 < policy.dp_clip_norm < float("inf"):
            raise ValueError(f"node config: dp-clip-norm must be a finite number > 0, got {policy.dp_clip_norm}")
        if not 0 < policy.dp_delta < 1:
            raise ValueError(f"node config: dp-delta must be in (0, 1), got {policy.dp_delta}")
        return policy

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
