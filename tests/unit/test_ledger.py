"""The privacy ledger: composition with dp-accounting's PLD accountant, the budget, what is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest

from oscar_client.ledger import PrivacyLedger, Release, composed_epsilon, ledger_path
from oscar_common.dp_calibration import gaussian_sigma

DELTA = 1e-5


def dp_release(name: str, epsilon: float, sensitivity: float = 0.2) -> Release:
    return Release.now(release=name, client="c", data_dir="/data/c", scheme="pooled", classes=10, epsilon=epsilon,
                       delta=DELTA, sigma=gaussian_sigma(epsilon, DELTA, sensitivity), sensitivity=sensitivity)


def exact_release(name: str) -> Release:
    return Release.now(release=name, client="c", data_dir="/data/c", scheme="pooled", classes=10)


def test_one_release_composes_to_its_own_epsilon_and_none_to_zero() -> None:
    assert composed_epsilon([], DELTA) == 0.0
    assert composed_epsilon([dp_release("a", 2.0)], DELTA) == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize("epsilons", [(1.0, 1.0, 1.0), (0.5, 2.0), (4.0, 1.0, 8.0, 0.3)])
def test_gaussian_releases_compose_as_one_gaussian_of_the_combined_noise(epsilons) -> None:
    # Independent of the accountant: Gaussian mechanisms with noise multipliers z_i compose exactly into one
    # with z = (sum z_i^-2)^-1/2 (Dong, Roth & Su 2019, Gaussian differential privacy).
    releases = [dp_release(str(i), e, sensitivity=0.1 * (i + 1)) for i, e in enumerate(epsilons)]
    z = sum((r.sigma / r.sensitivity) ** -2 for r in releases) ** -0.5
    total = composed_epsilon(releases, DELTA)
    assert total == pytest.approx(dp_accounting.get_epsilon_gaussian(z, DELTA), rel=1e-5)
    assert max(epsilons) < total < sum(epsilons)  # tighter than adding up, never below the largest


def test_an_exact_release_makes_the_total_infinite() -> None:
    assert composed_epsilon([dp_release("a", 1.0), exact_release("b")], DELTA) == math.inf


def test_the_budget_allows_up_to_it_counts_repeats_once_and_refuses_past_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(tmp_path)
    ledger.check_budget(dp_release("a", 2.0), DELTA, budget=2.0)  # exactly the budget
    ledger.record(dp_release("a", 2.0), DELTA)
    ledger.check_budget(dp_release("a", 2.0), DELTA, budget=2.0)  # the same noise again: free
    with pytest.raises(ValueError, match=r"dp-budget=2 \(at dp-delta 1e-05\) refuses this release: 1 earlier "
                                         r"releases add up to epsilon 2, and this one \(epsilon 0.5\) brings the "
                                         r"total to 2.\d+; upload with a smaller dp-epsilon") as refused:
        ledger.check_budget(dp_release("b", 0.5), DELTA, budget=2.0)
    assert str(ledger_path(tmp_path)) in str(refused.value)
    ledger.check_budget(dp_release("b", 0.5), DELTA, budget=0)  # no budget: no limit
    with pytest.raises(ValueError, match="this upload is not differentially private.*set dp-epsilon"):
        ledger.check_budget(exact_release("c"), DELTA, budget=100.0)


def test_the_ledger_file_lists_releases_once_with_their_total(tmp_path: Path) -> None:
    for release in (dp_release("a", 1.0), dp_release("a", 1.0), dp_release("b", 1.0)):
        PrivacyLedger.load(tmp_path).record(release, DELTA)
    written = json.loads(ledger_path(tmp_path).read_text())
    assert [(r["release"], r["epsilon"]) for r in written["releases"]] == [("a", 1.0), ("b", 1.0)]
    assert written["total"]["epsilon"] == pytest.approx(composed_epsilon(PrivacyLedger.load(tmp_path).releases,
                                                                         DELTA))
    assert written["total"]["delta"] == DELTA and "PLDAccountant" in written["total"]["accountant"]
    view = PrivacyLedger.load(tmp_path).view(dp_release("b", 1.0), DELTA, budget=0)
    assert view["releases_before"] == 2 and view["this_release"].startswith("a repeat")
    assert view["epsilon_before"] == view["epsilon_after"] == written["total"]["epsilon"]
    PrivacyLedger.load(tmp_path).record(exact_release("c"), DELTA)
    assert json.loads(ledger_path(tmp_path).read_text())["total"]["epsilon"].startswith("infinite")


def test_an_unreadable_ledger_is_never_silently_replaced(tmp_path: Path) -> None:
    ledger_path(tmp_path).parent.mkdir(parents=True)
    ledger_path(tmp_path).write_text('{"releases": [{"release": "a"')
    with pytest.raises(ValueError, match="privacy ledger .* is unreadable .* no longer counted"):
        PrivacyLedger.load(tmp_path)
