"""The server's run directory: everything needed to audit (and later resume) one OSCAR run.

::

    <run-dir>/<run-name>/
        config.json                  the OscarConfig of this run
        payloads/<client>.safetensors each accepted upload, written atomically as it arrives
        uploads.json                 written when the upload round is over: who was accepted or rejected
        prompts.json                 decoded prompts (pooled scheme), one per (client, class)
        synthetic/<class>/<client>__c<id>__<index>.png   ImageFolder of generated images
        checkpoint.safetensors       training state after the last finished epoch
        model.safetensors            the trained ResNet-18
        report.json, report.md, samples.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from oscar_common.config import OscarConfig
from oscar_common.files import atomic_write_bytes, atomic_write_json
from oscar_common.wire import ClientPayload


@dataclass(frozen=True)
class RunDirectory:
    root: Path

    @classmethod
    def for_run(cls, cfg: OscarConfig, run_id: int) -> "RunDirectory":
        name = cfg.run_name or f"run-{run_id}"
        root = Path(cfg.run_dir).expanduser().resolve() / name
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def payloads_dir(self) -> Path:
        return self.root / "payloads"

    @property
    def synthetic_dir(self) -> Path:
        return self.root / "synthetic"

    @property
    def prompts_path(self) -> Path:
        return self.root / "prompts.json"

    @property
    def uploads_path(self) -> Path:
        return self.root / "uploads.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def model_path(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def samples_png(self) -> Path:
        return self.root / "samples.png"

    def save_config(self, cfg: OscarConfig) -> None:
        atomic_write_json(self.root / "config.json", cfg.to_dict())

    def save_payload(self, payload: ClientPayload, node_id: int) -> Path:
        """Persist an accepted upload as safetensors (arrays) + string metadata; never pickle."""
        path = self.payloads_dir / f"{payload.client_name}.safetensors"
        metadata = {
            "node_id": str(node_id),
            "client_name": payload.client_name,
            "scheme": payload.scheme,
            "encoder_id": payload.encoder_id,
            "num_images": str(payload.num_images),
            "unreadable_images": str(payload.unreadable_images),
            "skipped_classes": json.dumps(payload.skipped_classes),
            "format_version": str(payload.format_version),
        }
        blob = save({"class_ids": payload.class_ids, "counts": payload.counts,
                     "means": np.ascontiguousarray(payload.means)}, metadata=metadata)
        atomic_write_bytes(path, blob)
        return path

    def load_payload(self, path: Path) -> tuple[ClientPayload, int]:
        from safetensors import safe_open

        arrays = load_file(str(path))
        with safe_open(str(path), framework="np") as handle:
            meta = handle.metadata()
        payload = ClientPayload(
            class_ids=arrays["class_ids"], counts=arrays["counts"], means=arrays["means"],
            scheme=meta["scheme"], encoder_id=meta["encoder_id"], client_name=meta["client_name"],
            num_images=int(meta["num_images"]), unreadable_images=int(meta["unreadable_images"]),
            skipped_classes=json.loads(meta["skipped_classes"]), format_version=int(meta["format_version"]),
        )
        return payload, int(meta["node_id"])

    def save_upload_round(self, accepted: list[tuple[int, str, int]], rejected: list[dict]) -> None:
        """Mark the upload round as over: (node id, client name, upload bytes) of each accepted upload."""
        atomic_write_json(self.uploads_path, {
            "accepted": [{"node_id": n, "client_name": c, "upload_bytes": b} for n, c, b in accepted],
            "rejected": rejected,
        })

    def accepted_uploads(self) -> list[ClientPayload]:
        """The accepted uploads of the finished upload round, ordered by client name (the order every
        server stage works in, so results do not depend on the order in which uploads arrived)."""
        saved = self.load_upload_round()
        if saved is None:
            raise FileNotFoundError(f"{self.uploads_path} does not exist: the upload round of this run never "
                                    "finished, so there is nothing to synthesise from")
        return sorted((payload for payload, _, _ in saved[0]), key=lambda p: p.client_name)

    def load_upload_round(self) -> tuple[list[tuple[ClientPayload, int, int]], list[dict]] | None:
        """The finished upload round, or None if it never finished (then clients must upload again)."""
        if not self.uploads_path.exists():
            return None
        record = json.loads(self.uploads_path.read_text())
        accepted = []
        for entry in record["accepted"]:
            payload, node_id = self.load_payload(self.payloads_dir / f"{entry['client_name']}.safetensors")
            accepted.append((payload, node_id, int(entry["upload_bytes"])))
        return accepted, list(record["rejected"])
