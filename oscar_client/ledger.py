"""The privacy ledger of a client's data: every release of it, and what they add up to.

One DP upload is (epsilon, delta)-DP on its own. Releasing the same images again with fresh noise
composes: a server that changes ``seed``, ``min-images-per-class`` or ``dp-max-epsilon`` between runs gets
new noise on the same data each time. ``<output-dir>/privacy/ledger.json``, next to the noise key, lists
each distinct release and their composed total; node config ``dp-budget`` refuses a release that would take
the total past it.

* A release is named by :func:`oscar_client.privacy.release_id`: equal exactly when the same key, data and
  parameters draw the same noise, so a retry or the upload after a preview adds nothing.
* Composition: dp-accounting's privacy-loss-distribution accountant (``PLDAccountant``), one
  ``GaussianDpEvent`` per release with noise multiplier sigma / sensitivity. The sensitivity recorded is
  already the replace-one bound 2C/n_pub, so the accountant's default relation (which takes the multiplier
  as the Gaussian mechanism with sensitivity 1) is the right one; its ``REPLACE_ONE`` would double it again.
  The total is reported at the client's ``dp-delta``. Each image sits in one class, so across classes a
  release composes in parallel; the ledger composes whole releases, which is exact for an image that is in
  every one of them and an upper bound otherwise.
* An upload without DP is recorded too: its means are exact, so the data's total is infinite from then on.
* The ledger covers this output dir: a client that changes ``output-dir`` starts a new ledger and a new
  noise key, and the ledger can no longer speak for its data. Keep the output dir across runs.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from oscar_common.files import atomic_write_json

LEDGER_FILE = "ledger.json"
ACCOUNTANT = "dp-accounting PLDAccountant (privacy loss distributions), one Gaussian event per release"
# The PLD accountant is pessimistic by ~1e-11 (relative) on a single release: a release that spends exactly
# the budget is allowed.
BUDGET_SLACK = 1e-9


def ledger_path(output_dir: Path) -> Path:
    return Path(output_dir) / "privacy" / LEDGER_FILE


@dataclass(frozen=True)
class Release:
    """One upload of this data: DP (epsilon, delta, sigma, sensitivity) or exact (all None)."""

    release: str  # privacy.release_id for DP; the upload digest for an exact upload
    time: str
    client: str
    data_dir: str
    scheme: str
    classes: int
    epsilon: float | None = None
    delta: float | None = None
    sigma: float | None = None
    sensitivity: float | None = None

    @property
    def private(self) -> bool:
        return self.sigma is not None

    @classmethod
    def now(cls, **values: Any) -> "Release":
        return cls(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **values)


def composed_epsilon(releases: Sequence[Release], delta: float) -> float:
    """The epsilon at ``delta`` of all ``releases`` together (0 for none, infinity if one was exact)."""
    if not releases:
        return 0.0
    if not all(r.private for r in releases):
        return math.inf
    import dp_accounting  # on first use: 0.7 s of imports a client without DP never needs
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    for release in releases:
        accountant.compose(dp_accounting.GaussianDpEvent(release.sigma / release.sensitivity))
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """The releases of one output dir's data, read from and written to ``privacy/ledger.json``."""

    def __init__(self, path: Path, releases: list[Release]) -> None:
        self.path, self.releases = path, releases

    @classmethod
    def load(cls, output_dir: Path) -> "PrivacyLedger":
        path = ledger_path(output_dir)
        if not path.exists():
            return cls(path, [])
        try:
            entries = json.loads(path.read_text())["releases"]
            return cls(path, [Release(**entry) for entry in entries])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start afresh silently: an empty ledger would forget what this data already released.
            raise ValueError(f"the privacy ledger {path} is unreadable ({type(exc).__name__}: {exc}): repair it, "
                             "or move it away knowing that its releases are then no longer counted") from None

    def knows(self, release: Release) -> bool:
        return any(r.release == release.release for r in self.releases)

    def with_release(self, release: Release) -> list[Release]:
        """The releases once ``release`` is out (the same list when it repeats one already out)."""
        return self.releases if self.knows(release) else [*self.releases, release]

    def view(self, release: Release, delta: float, budget: float) -> dict[str, Any]:
        """What the upload summary and the preview show: the ledger before and after this release."""
        after = self.with_release(release)
        return {
            "ledger": str(self.path),
            "releases_before": len(self.releases),
            "this_release": "a repeat of an earlier release (same noise: free)" if self.knows(release) else "new",
            "epsilon_before": _number(composed_epsilon(self.releases, delta)),
            "epsilon_after": _number(composed_epsilon(after, delta)),
            "delta": delta,
            "budget": budget or None,
            "accountant": ACCOUNTANT,
        }

    def check_budget(self, release: Release, delta: float, budget: float) -> None:
        """Refuse (ValueError) a release that takes the composed epsilon past ``budget`` (0: no budget)."""
        if budget <= 0:
            return
        after = composed_epsilon(self.with_release(release), delta)
        if after <= budget * (1 + BUDGET_SLACK):
            return
        if not release.private:
            why = "this upload is not differentially private (exact means)"
            fix = "set dp-epsilon in the node config"
        elif not all(r.private for r in self.releases):
            why = "an earlier upload of this data was not differentially private"
            fix = "this data's epsilon is already unbounded; raise or remove dp-budget knowingly"
        else:
            before = composed_epsilon(self.releases, delta)
            why = (f"{len(self.releases)} earlier releases add up to epsilon {before:.4g}, and this one "
                   f"(epsilon {release.epsilon:g}) brings the total to {after:.4g}")
            fix = ("upload with a smaller dp-epsilon, or ask the server to run with the settings of an earlier "
                   "release (a repeat is free)")
        raise ValueError(f"node config dp-budget={budget:g} (at dp-delta {delta:g}) refuses this release: {why}; "
                         f"{fix}. The ledger: {self.path}")

    def record(self, release: Release, delta: float) -> None:
        """Add ``release`` (once) and write the ledger with its composed total."""
        self.releases = self.with_release(release)
        atomic_write_json(self.path, {
            "releases": [asdict(r) for r in self.releases],
            "total": {"epsilon": _number(composed_epsilon(self.releases, delta)), "delta": delta,
                      "accountant": ACCOUNTANT},
        })


def _number(value: float) -> float | str:
    """JSON has no infinity: an unbounded epsilon is written as text."""
    return value if math.isfinite(value) else "infinite (an upload without DP)"
