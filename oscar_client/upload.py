"""A client's upload, built the one way both the ClientApp and ``oscar-preview`` build it.

Local images -> captions -> embeddings -> per-class rows (the mean, or k prototypes) -> optional
differential privacy -> :class:`oscar_common.wire.Upload`. What the upload leaves out (label counts,
unreadable images, folder names outside the federation) is written to the client's own output dir
(``upload-summary.json``) and log, never sent unless the run asks for counts and the client agrees.
Every upload is checked against, and once sent recorded in, the privacy ledger (``oscar_client.ledger``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oscar_client.caption_cache import CaptionCache
from oscar_client.encoder import EncodedClient, encode_client
from oscar_client.ledger import PrivacyLedger, Release
from oscar_client.policy import ClientPolicy
from oscar_client.privacy import keyed_generator, privatize_class_means, release_id
from oscar_client.prototypes import class_prototypes
from oscar_common.devices import resolve_device, resolve_dtype
from oscar_common.files import atomic_write_bytes, atomic_write_json
from oscar_common.node_settings import NodeSettings
from oscar_common.wire import DpRecord, SharedCounts, TrainInstruction, Upload

log = logging.getLogger("oscar.client")


@dataclass
class PreparedUpload:
    upload: Upload
    encoded: EncodedClient
    digest: str  # of the data and settings this upload releases: a preview approves this value
    local_summary: dict[str, Any]  # what stays on the client
    release: Release  # what the privacy ledger records once the upload is sent (record_release)


def prepare_upload(node: NodeSettings, instruction: TrainInstruction, policy: ClientPolicy, *,
                   keep_embeddings: bool = False) -> PreparedUpload:
    """Everything the ClientApp sends, and what it keeps; ``keep_embeddings`` keeps per-image embeddings
    (the preview needs them; DP and prototypes need them anyway)."""
    class_names = list(instruction.class_names)
    train, _, unknown_folders = node.load_split(class_names, instruction.seed)
    device = resolve_device(node.device)
    dtype = resolve_dtype("auto", device)
    min_images = policy.min_images(instruction)
    epsilon = policy.epsilon(instruction)
    prototypes = instruction.prototypes_per_class
    if epsilon > 0 and prototypes > 1:
        raise ValueError("differential privacy cannot be combined with prototypes-per-class > 1 (k-means makes one "
                         "image move several prototypes): the server must use prototypes-per-class = 1")
    clip_norm = policy.clip_norm(instruction) if epsilon > 0 else None  # tokens + DP needs an explicit one
    # encode_client keys the cache by the captioner's settings; it lives in the client's output dir
    with CaptionCache.open(node.output_dir / "caption-cache") if policy.caption_cache else nullcontext() as cache:
        encoded = encode_client(
            train, class_names, scheme=instruction.scheme, captioner_id=instruction.captioner,
            encoder_id=instruction.encoder_id, device=device, dtype=dtype, batch_size=instruction.caption_batch_size,
            max_new_tokens=instruction.caption_max_tokens, blip2_prompt=instruction.blip2_prompt,
            num_workers=policy.loader_workers, cache=cache,
            keep_embeddings=keep_embeddings or epsilon > 0 or prototypes > 1,
        )
    if not encoded.captions:
        raise ValueError(f"client {node.name}: no readable training images under {node.data_dir}")

    by_class = {int(c): n for c, n in zip(encoded.class_ids, encoded.counts)}
    kept = sorted(c for c, n in by_class.items() if n >= min_images)
    dropped = sorted(set(by_class) - set(kept))
    if not kept:
        raise ValueError(f"client {node.name}: no class has {min_images} training images "
                         f"(min-images-per-class); largest has {max(by_class.values(), default=0)}")
    data = caption_digest(encoded, kept)
    # DP noise is keyed on the client's secret, the data and these parameters; so is the release's name.
    noise = None if clip_norm is None else (_noise_key(node.output_dir), {
        "epsilon": epsilon, "delta": policy.dp_delta, "clip_norm": clip_norm, "min_images": min_images,
        "scheme": instruction.scheme, "encoder": instruction.encoder_id})
    class_ids, means, counts, dp = _rows(encoded, kept, instruction, min_images, data, noise)
    digest = approval_digest(instruction, policy, data)
    release = Release.now(
        release=digest if noise is None else release_id(noise[0], data=data, parameters=noise[1]),
        client=node.name, data_dir=str(node.data_dir), scheme=instruction.scheme, classes=len(kept),
        **({} if dp is None else {"epsilon": dp.epsilon, "delta": dp.delta, "sigma": dp.sigma,
                                  "sensitivity": dp.sensitivity}))
    ledger = PrivacyLedger.load(node.output_dir)
    ledger.check_budget(release, policy.dp_delta, policy.dp_budget)

    shares = policy.shares_counts(instruction)
    upload = Upload(
        class_ids=class_ids, means=means, scheme=instruction.scheme, encoder_id=instruction.encoder_id,
        client_name=node.name, prototypes_per_class=prototypes, counts=counts if shares else None,
        shared=SharedCounts(num_images=int(sum(by_class.values())), unreadable_images=len(encoded.unreadable),
                            skipped_classes=list(unknown_folders)) if shares else None,
        dp=dp, transport_dtype=instruction.transport_dtype,
    )
    summary = {
        "client": node.name,
        "images_per_class": {class_names[c]: int(n) for c, n in sorted(by_class.items())},
        "classes_uploaded": [class_names[c] for c in kept],
        "classes_below_minimum": {class_names[c]: int(by_class[c]) for c in dropped},
        "min_images_per_class": min_images,
        "unreadable_images": [str(s.path) for s in encoded.unreadable],
        "folders_not_in_the_federation": list(unknown_folders),
        "captioned": encoded.captioned,
        "captions_from_cache": encoded.cached,
        "shared_counts": shares,
        "differential_privacy": None if dp is None else dp.as_dict(),
        "prototypes_per_class": prototypes,
        "upload_digest": digest,
        "privacy_ledger": ledger.view(release, policy.dp_delta, policy.dp_budget),
    }
    if dropped:
        log.info("client %s: %d classes have fewer than %d images and stay here: %s", node.name, len(dropped),
                 min_images, ", ".join(class_names[c] for c in dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
    if unknown_folders:
        log.info("client %s: %d folders are not classes of this federation and stay here: %s", node.name,
                 len(unknown_folders), ", ".join(unknown_folders[:10]))
    return PreparedUpload(upload=upload, encoded=encoded, digest=digest, local_summary=summary, release=release)


def _rows(encoded: EncodedClient, kept: list[int], instruction: TrainInstruction, min_images: int, data: bytes,
          noise: tuple[bytes, dict[str, Any]] | None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, DpRecord | None]:
    """(class_ids, means, counts, dp) of the kept classes: one mean per class, or k prototypes, or DP means
    (``noise``: the key and parameters of the DP release)."""
    index = {int(c): i for i, c in enumerate(encoded.class_ids)}
    if noise is None and instruction.prototypes_per_class == 1:
        rows = [index[c] for c in kept]
        return (np.asarray(kept, dtype=np.int64), encoded.means[rows].astype(np.float32),
                encoded.counts[rows].astype(np.int64), None)
    per_class = {c: encoded.embeddings[encoded.labels == c] for c in kept}
    if noise is not None:
        # pooled: no centre (CLIP embeddings are unit vectors); tokens: the empty prompt's states, so that
        # clipping acts on a caption's departure from them rather than shrinking everything
        key, parameters = noise
        rng = keyed_generator(key, data=data, parameters=parameters)
        means, record = privatize_class_means([per_class[c] for c in kept], epsilon=parameters["epsilon"],
                                              delta=parameters["delta"], clip_norm=parameters["clip_norm"],
                                              min_images=min_images, rng=rng, center=encoded.empty_prompt)
        counts = np.asarray([len(per_class[c]) for c in kept], dtype=np.int64)
        return np.asarray(kept, dtype=np.int64), means.astype(np.float32), counts, record
    ids, means, counts = [], [], []
    for c in kept:
        centroids, sizes = class_prototypes(per_class[c], k=instruction.prototypes_per_class, min_size=min_images,
                                            seed=instruction.seed)
        ids += [c] * len(centroids)
        means.append(centroids)
        counts += sizes.tolist()
    return (np.asarray(ids, dtype=np.int64), np.concatenate(means).astype(np.float32),
            np.asarray(counts, dtype=np.int64), None)


def _noise_key(output_dir: Path) -> bytes:
    """A secret that never leaves this client: DP noise derives from it, so the server cannot predict it,
    and the same data under the same settings gets the same noise (a retry or a preview costs no epsilon).
    The guarantee rests on it staying secret: with it and a guess of the data, the noise of every release
    made with it can be recomputed and removed (docs/privacy.md: the key, and rotating it)."""
    path = output_dir / "privacy" / "noise.key"
    if not path.exists():
        atomic_write_bytes(path, secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


def caption_digest(encoded: EncodedClient, kept: list[int]) -> bytes:
    """The released data, identified by its captions per kept class (in input order).

    Captions reproduce exactly (they come from the caption cache, or from deterministic greedy decoding),
    where float embeddings can differ in their last bits between processes: a preview and the upload that
    follows it must agree on this digest, and DP noise is keyed on it.
    """
    by_class: dict[int, list[str]] = {}
    for caption, label in zip(encoded.captions, encoded.labels.tolist()):
        by_class.setdefault(label, []).append(caption)
    digest = hashlib.sha256()
    for class_id in kept:
        digest.update(f"\x00class {class_id}\x00".encode())
        for caption in by_class.get(int(class_id), []):
            digest.update(caption.encode() + b"\x00")
    return digest.digest()


def approval_digest(instruction: TrainInstruction, policy: ClientPolicy, data: bytes) -> str:
    """What a preview approves: this data, under these server and client settings."""
    settings = {key: value for key, value in instruction.to_record().items()}
    settings["client"] = {"min-images": policy.min_images(instruction), "epsilon": policy.epsilon(instruction),
                          "delta": policy.dp_delta, "clip-norm": policy.dp_clip_norm,
                          "share-counts": policy.shares_counts(instruction)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + data).hexdigest()


def write_local_summary(node: NodeSettings, prepared: PreparedUpload) -> Path:
    path = node.output_dir / "upload-summary.json"
    atomic_write_json(path, prepared.local_summary)
    return path


def record_release(node: NodeSettings, prepared: PreparedUpload, policy: ClientPolicy) -> Path:
    """Write the upload into the privacy ledger: call it when the upload is sent (a preview is not a release)."""
    ledger = PrivacyLedger.load(node.output_dir)  # read again: the ledger as it is now, not at prepare time
    ledger.record(prepared.release, policy.dp_delta)
    return ledger.path

