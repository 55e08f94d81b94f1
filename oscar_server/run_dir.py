"""The server's run directory: everything needed to audit (and later resume) one OSCAR run.

::

    <run-dir>/<run-name>/
        config.json                  the OscarConfig of this run
        payloads/<client>.safetensors each accepted upload, written atomically as it arrives
        uploads.json                 written when the upload round is over: who was accepted or rejected
        prompts.json                 decoded prompts (pooled scheme), one per (client, class)
        synthetic/<class>/<client>__c<id>__<index>.png   ImageFolder of the images that train the model
        synthetic-set-aside/<class>/...  generated images not kept for training (generate-per-class)
        fidelity.json                each synthetic image against the uploads (docs/fidelity.md)
        checkpoint.safetensors       training state after the last finished epoch
        model.safetensors            the trained ResNet-18
        report.json, report.md, samples.png, fidelity.png
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from oscar_common.config import OscarConfig
from oscar_common.files import atomic_write_json
from oscar_common.upload_rules import Upload
from oscar_server.outcomes import Rejection
from oscar_server.payload_file import read_payload, write_payload

# A run that got this far is never resumed (its report would be overwritten); a failed one may be.
FINISHED_STATUSES = ("completed", "partial")


class FinishedRunError(RuntimeError):
    """The named run already finished: resuming it would overwrite its report."""


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
    def set_aside_dir(self) -> Path:
        """Generated images that were not kept for training, in the layout of :attr:`synthetic_dir`."""
        return self.root / "synthetic-set-aside"

    @property
    def fidelity_path(self) -> Path:
        return self.root / "fidelity.json"

    @property
    def fidelity_png(self) -> Path:
        return self.root / "fidelity.png"

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
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def samples_png(self) -> Path:
        return self.root / "samples.png"

    def finished_status(self) -> str | None:
        """``completed`` or ``partial`` when the run went through (then it is never resumed), else None."""
        try:
            status = json.loads(self.report_json.read_text()).get("status")
        except (OSError, ValueError):
            return None
        return status if status in FINISHED_STATUSES else None

    def refuse_if_finished(self) -> None:
        """Raise :class:`FinishedRunError` (saying what to do instead) if the run went through."""
        status = self.finished_status()
        if status is not None:
            raise FinishedRunError(
                f"run {self.root.name} already finished ({status}); its report {self.report_json} was left as it "
                "is. Choose another run-name (an empty one gives a fresh run-<id> folder), e.g. `oscar-config "
                "YOUR.toml \"run-name='NEW'\" --out run.toml` and `flwr run ... --run-config run.toml`")

    def save_config(self, cfg: OscarConfig) -> None:
        atomic_write_json(self.config_path, cfg.to_dict())

    def save_payload(self, upload: Upload, node_id: int) -> Path:
        """Persist an accepted upload as the wire carried it (:mod:`oscar_server.payload_file`)."""
        path = self.payloads_dir / f"{upload.client_name}.safetensors"
        write_payload(path, upload, node_id)
        return path

    def load_payload(self, path: Path) -> tuple[Upload, int]:
        """An upload saved by :meth:`save_payload` and its node, validated again by the wire's rules."""
        return read_payload(path)

    def save_upload_round(self, accepted: list[tuple[int, str, int]], rejected: list[Rejection]) -> None:
        """Mark the upload round as over: (node id, client name, upload bytes) of each accepted upload."""
        atomic_write_json(self.uploads_path, {
            "accepted": [{"node_id": n, "client_name": c, "upload_bytes": b} for n, c, b in accepted],
            "rejected": [asdict(rejection) for rejection in rejected],
        })

    def load_upload_round(self) -> tuple[list[tuple[Upload, int, int]], list[Rejection]] | None:
        """The finished upload round, or None if it never finished (then clients must upload again)."""
        if not self.uploads_path.exists():
            return None
        record = json.loads(self.uploads_path.read_text())
        accepted = []
        for entry in record["accepted"]:
            upload, node_id = self.load_payload(self.payloads_dir / f"{entry['client_name']}.safetensors")
            accepted.append((upload, node_id, int(entry["upload_bytes"])))
        return accepted, [Rejection(**entry) for entry in record["rejected"]]

    def accepted_uploads(self) -> list[Upload]:
        """The accepted uploads of the finished upload round, ordered by client name (the order every
        server stage works in, so results do not depend on the order in which uploads arrived)."""
        saved = self.load_upload_round()
        if saved is None:
            raise FileNotFoundError(f"{self.uploads_path} does not exist: the upload round of this run never "
                                    "finished, so there is nothing to synthesise from")
        return sorted((upload for upload, _, _ in saved[0]), key=lambda u: u.client_name)
