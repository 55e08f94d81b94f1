"""``payloads/<client>.safetensors``: one accepted upload as the wire carried it, written and read back
without Flower.

The file holds the upload's arrays as safetensors and, in its header, the wire's metadata keys (each value
JSON-encoded) plus the node the upload came from. Reading it applies the wire's own rules
(:func:`oscar_common.upload_rules.validate_upload`), so a file edited by hand is refused like a bad upload;
nothing is ever unpickled. The expectation it is checked against comes from the file itself (the run
directory does not know the encoder's dimension): the rules an upload must meet on its own hold, and the
comparison with the server's instruction was made when the upload arrived.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from oscar_common.files import atomic_write_bytes
from oscar_common.upload_rules import Expectation, PayloadError, Upload, validate_upload

NODE_ID_KEY = "oscar.node-id"  # beside the upload's metadata: the node it came from


def write_payload(path: Path, upload: Upload, node_id: int) -> None:
    """Write ``upload`` (and the node it came from) atomically to ``path``."""
    metadata = {key: json.dumps(value) for key, value in upload.meta().items()}
    metadata[NODE_ID_KEY] = json.dumps(int(node_id))
    atomic_write_bytes(path, save(upload.arrays(), metadata=metadata))


def read_payload(path: Path) -> tuple[Upload, int]:
    """The upload stored at ``path`` and its node id; :class:`PayloadError` when the file breaks a rule."""
    try:
        with safe_open(str(path), framework="np") as handle:
            meta = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError) as exc:  # ValueError: a header value that is not JSON
        raise PayloadError(f"{path}: not a payload file this server wrote ({exc}); remove it and upload again, "
                           "or choose another run-name") from None
    if NODE_ID_KEY not in meta:
        raise PayloadError(f"{path}: no '{NODE_ID_KEY}' in its header, so it was not written by this server")
    node_id = meta.pop(NODE_ID_KEY)
    return validate_upload(meta, _StoredArrays(arrays), _expectation_of(arrays, meta)), int(node_id)


class _StoredArrays:
    """Arrays read from a payload file, for :func:`validate_upload` (already decoded: the server wrote them)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def names(self) -> set[str]:
        return set(self.arrays)

    def declared_size(self, name: str) -> int:
        return int(self.arrays[name].nbytes)

    def decode(self, name: str) -> np.ndarray:
        return self.arrays[name]


def _expectation_of(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Expectation:
    """What the stored upload itself states (scheme, encoder, shapes): see the module docstring."""
    class_ids, means = arrays.get("class_ids"), arrays.get("means")
    prototypes = meta.get("prototypes-per-class")
    return Expectation(
        scheme=str(meta.get("scheme")), encoder_id=str(meta.get("encoder-id")),
        num_classes=int(np.max(class_ids)) + 1 if class_ids is not None and class_ids.size else 0,
        feature_dim=int(means.shape[-1]) if means is not None and means.ndim else None,
        max_bytes=sum(int(a.nbytes) for a in arrays.values()) + 1,
        prototypes_per_class=prototypes if isinstance(prototypes, int) else 1)  # not an int: the rules say so
