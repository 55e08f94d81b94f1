"""What a client is willing to share, and how: its own node config, which the server cannot override.

    flower-supernode ... --node-config "data-dir='/data/clipart' dp-epsilon=4 min-images-per-class=20"

| key | default | meaning |
|---|---|---|
| ``min-images-per-class`` | the server's | classes with fewer training images stay home; can raise the server's minimum, never lower it |
| ``share-counts`` | ``true`` | ``false`` refuses to send label counts even when the run asks for them (``share-counts``) |
| ``dp-epsilon`` | ``0`` (off) | differential privacy on the means with this epsilon; the server may require at most some epsilon, and the client uses the smaller of the two |
| ``dp-delta`` | ``1e-5`` | the delta of (epsilon, delta)-DP |
| ``dp-clip-norm`` | ``1.0`` | each caption embedding is clipped to this L2 norm (CLIP's are unit vectors: nothing is clipped) |
| ``caption-cache`` | ``true`` | reuse captions of unchanged images from ``<output-dir>/caption-cache`` |
| ``require-preview-approval`` | ``false`` | refuse to upload until ``oscar-preview`` has shown this very upload (README "Privacy") |
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
    dp_clip_norm: float = 1.0
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
            dp_clip_norm=number("dp-clip-norm", float, 1.0),
            caption_cache=flag("caption-cache", True),
            require_preview_approval=flag("require-preview-approval", False),
            loader_workers=number("loader-workers", int, -1),
        )
        if policy.min_images_per_class < 0 or policy.dp_epsilon < 0 or policy.dp_clip_norm <= 0:
            raise ValueError("node config: min-images-per-class and dp-epsilon must be >= 0, dp-clip-norm > 0")
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

    def shares_counts(self, instruction: TrainInstruction) -> bool:
        return instruction.share_counts and self.share_counts
