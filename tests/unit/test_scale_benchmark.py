"""oscar_bench/federation/scale.py's reading of a run's logs: clients per minute in each round and the clients' own work."""

from __future__ import annotations

import pytest

from oscar_bench.federation import scale

RAY = "\x1b[36m(ClientAppActor pid=26572)\x1b[0m "


def test_rounds_per_minute_from_the_server_and_client_lines() -> None:
    """Five uploads accepted 10 s apart in a 50 s round: 6 a minute over the round, 6 between the first and last;
    evaluations from the clients' own lines (the server logs them all at once at the end)."""
    lines = [f"2026-12-04 22:53:{10 * k:02d},000 oscar.server INFO accepted upload from node {k} (client-{k}): 1 classes"
             for k in range(5)]
    lines += [f"{RAY}2026-12-04 22:55:0{k},500 oscar.client INFO client client-{k}: uploading 4 rows of shape [512] "
              f"(no DP) after {k + 1}.5s; what stays here: /x" for k in range(5)]
    lines += [f"{RAY}2026-12-04 22:56:{k * 15:02d},000 oscar.client INFO client client-{k}: test accuracy 0.1 on 9 "
              "images (0 unreadable skipped); weights saved to /x" for k in range(3)]
    lines += ["2026-12-04 22:57:00,000 oscar.server INFO client client-0 (node 1): test accuracy 0.1 on 9 images",
              "2026-12-04 22:53:05,000 oscar.server INFO sending the encode instruction to 5 nodes"]
    rates = scale.round_rates(lines, {"upload": 50.0, "evaluation": 40.0})
    assert rates["upload"] == {"clients": 5, "seconds": 50.0, "per_minute": 6.0, "first_to_last_per_minute": 6.0}
    assert rates["evaluation"] == {"clients": 3, "seconds": 40.0, "per_minute": 4.5, "first_to_last_per_minute": 4.0}
    work = scale.client_upload_seconds(lines)
    assert (work["clients"], work["median"]) == (5, 3.5) and work["p90"] == pytest.approx(5.1)
