"""The whole OSCAR round on real processes: one SuperLink and four SuperNodes on 127.0.0.1, three runs.

The clients are what a newcomer meets: ``plain`` reads its share of a benchmark (the `domains` adapter over
the demo digits), ``textured`` requires a preview before it uploads, ``noisy`` has corrupt images in its
test split, ``broken`` points at a folder that does not exist.

1. pooled: ``textured`` refuses (no preview) and ``broken`` fails, both named in one line; the others
   evaluate (corrupt test images skipped and counted); the run is ``partial`` and says why.
2. the client previews the tokens run (``oscar-preview``), then the tokens run takes its upload.
3. class names that match no folder: every client says so by name and the run fails, in its last line.

Tiny random models (accuracy is meaningless): these runs check the plumbing, the report and the logs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import tomli_w
from safetensors import safe_open

from e2e_support import FAST, hub_env
from oscar_client import preview
from oscar_demo.demo import demo_run_config
from oscar_demo.federation import ClientSpec, LocalFederation

pytestmark = pytest.mark.e2e
PAYLOAD_OVERHEAD = 2048  # Flower's framing around the means (record names, metadata, object headers)
RUN = {**FAST, "min-clients": 2, "min-images-per-class": 2}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tiny_hub: Path, demo_clients: dict[str, Path]):
    work = tmp_path_factory.mktemp("round")
    data_root = next(iter(demo_clients.values())).parent
    noisy = work / "noisy"
    shutil.copytree(demo_clients["inverted-noisy"], noisy)
    corrupt = []
    for digit in ("one", "five", "nine"):  # truncated PNGs, listed in the test split
        path = noisy / digit / f"corrupt-{digit}.png"
        path.write_bytes((noisy / digit).glob("*.png").__next__().read_bytes()[:60])
        corrupt.append(f"{digit}/{path.name}")
    keep = sorted(p.relative_to(noisy).as_posix() for p in noisy.glob("*/*.png") if "corrupt" not in p.name)[::6]
    (work / "noisy-test.txt").write_text("\n".join(keep + corrupt) + "\n")
    clients = [
        ClientSpec("plain", work / "unused", {"benchmark": "domains", "benchmark-root": str(data_root),
                                              "client": "plain", "test-shots": 1}),
        ClientSpec("textured", demo_clients["textured"], {"require-preview-approval": True}),
        ClientSpec("noisy", noisy, {"test-list": str(work / "noisy-test.txt")}),
        ClientSpec("broken", work / "no-such-dir"),
    ]
    with LocalFederation(work, clients, env=hub_env(tiny_hub), stream=False) as fed:
        fed.corrupt = len(corrupt)
        yield fed
    # superlink, supernodes and what Flower started under them, all gone
    assert len(fed.stopped) > len(clients) + 1 and not fed.leftovers


def _run(federation: LocalFederation, name: str, **overrides) -> tuple[dict, str]:
    run_config = demo_run_config(federation.workdir / "runs", name, **{**RUN, **overrides})
    submission = federation.submit(run_config)
    try:
        report = json.loads(federation.wait(submission, timeout=900).read_text())
        assert submission.proc.poll() is not None, "the ServerApp's log stream was still open"
    finally:
        federation.cancel(submission)
    return report, submission.log_path.read_text()


def test_pooled_round_with_a_refusing_a_broken_and_a_noisy_client(federation: LocalFederation) -> None:
    # Waves of 2 on real SuperNodes (4 of them): the SuperLink gets the messages as replies come in.
    report, log = _run(federation, "pooled", scheme="pooled", **{"max-in-flight": 2})
    assert "upload round: 4 messages, at most 2 outstanding (max-in-flight)" in log
    run_dir = federation.workdir / "runs" / "pooled"
    clients = {c["name"]: c for c in report["clients"]}
    assert sorted(clients) == ["noisy", "plain"]
    rejected = {r["name"]: r["reason"] for r in report["rejected"]}
    assert sorted(rejected) == ["broken", "textured"]
    assert "require-preview-approval is on and there is no preview yet" in rejected["textured"]
    assert "no-such-dir" in rejected["broken"] and "\n" not in rejected["broken"]
    assert report["status"] == "partial" and len(report["problems"]) == 2

    for client in clients.values():
        k = len(client["classes_uploaded"])
        assert client["payload_shape"] == [k, 512] and client["shared_counts"] is None
        assert k * 512 * 4 <= client["upload_bytes"] <= 1.1 * k * 512 * 4 + PAYLOAD_OVERHEAD
        assert client["test_accuracy"] is not None and client["num_test"] > 0
        weights = federation.workdir / "client-output" / client["name"] / "oscar_resnet18.safetensors"
        with safe_open(str(weights), framework="pt") as handle:
            assert "fc.weight" in set(handle.keys())
        # the default upload carries ids and means only; counts and unreadable images stay on the client
        with safe_open(str(run_dir / "payloads" / f"{client['name']}.safetensors"), framework="np") as handle:
            assert set(handle.keys()) == {"class_ids", "means"}
        summary = json.loads((federation.workdir / "client-output" / client["name"] / "upload-summary.json")
                             .read_text())
        assert summary["classes_uploaded"] == client["classes_uploaded"]
    assert clients["noisy"]["unreadable_test_images"] == federation.corrupt
    assert clients["plain"]["num_test"] == 10  # test-shots=1 of the benchmark, per class

    expected_images = sum(len(c["classes_uploaded"]) * FAST["images-per-class"] for c in clients.values())
    assert report["synthesis"]["images"] == expected_images
    assert len(list((run_dir / "synthetic").rglob("*.png"))) == expected_images
    assert json.loads((run_dir / "prompts.json").read_text()) == report["synthesis"]["prompts"]
    assert report["training"]["images"] == expected_images
    assert (run_dir / "samples.png").stat().st_size > 0  # written before the report became final
    assert "tiny random-weight stand-ins" in (run_dir / "report.md").read_text()
    # the log a newcomer reads: no bar redraws, one waiting line per change, the status line last
    assert "\r" not in log and "\x1b[A" not in log
    assert len(re.findall(r"waiting for clients", log)) <= 4
    status_lines = [line for line in log.splitlines() if "OSCAR status:" in line]
    assert len(status_lines) == 1 and "OSCAR status: partial" in status_lines[0]
    # the server's last word (Flower's own closing lines follow it)
    assert [line for line in log.splitlines() if " oscar." in line][-1] == status_lines[0]


def test_a_previewed_client_joins_the_tokens_round(federation: LocalFederation, tiny_hub: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = {**RUN, "scheme": "tokens", "min-clients": 3}
    run_config = demo_run_config(federation.workdir / "runs", "tokens", **overrides)
    toml = federation.workdir / "tokens-preview.toml"
    toml.write_text(tomli_w.dumps(run_config))
    for key, value in hub_env(tiny_hub).items():
        monkeypatch.setenv(key, value)
    textured = next(c for c in federation.clients if c.name == "textured")
    output = federation.workdir / "client-output" / "textured"
    node_config = (f"data-dir='{textured.data_dir}' name='textured' output-dir='{output}' "
                   "require-preview-approval=true")
    assert preview.main(["--node-config", node_config, "--run-config", str(toml), "--images-per-class", "1"]) == 0
    shown = json.loads((output / "preview" / "preview.json").read_text())
    assert len(shown["classes"]) == 10 and all(c["nearest_caption"] for c in shown["classes"])
    assert "| zero |" in (output / "preview" / "preview.md").read_text()

    report, _ = _run(federation, "tokens", scheme="tokens", **{"min-clients": 3})
    clients = {c["name"]: c for c in report["clients"]}
    assert sorted(clients) == ["noisy", "plain", "textured"]
    for client in clients.values():
        k = len(client["classes_uploaded"])
        assert client["payload_shape"][:2] == [k, 77] and client["test_accuracy"] is not None
    assert report["synthesis"]["scheme"] == "tokens" and report["synthesis"]["prompts"] is None
    # captions of unchanged images come from the client's cache: the second round captions nothing
    summary = json.loads((federation.workdir / "client-output" / "noisy" / "upload-summary.json").read_text())
    assert summary["captioned"] == 0 and summary["captions_from_cache"] > 0


def test_class_names_that_match_no_folder_fail_the_run_by_name(federation: LocalFederation) -> None:
    report, log = _run(federation, "mismatch", **{"class-names": "airplane,axe,clock"})
    assert report["status"] == "failed" and report["error"].startswith("NotEnoughClientsError")
    reasons = {r["name"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"plain", "textured", "noisy", "broken"}
    assert "is a class of this federation" in reasons["noisy"] and "'airplane', 'axe', 'clock'" in reasons["noisy"]
    assert all("\n" not in reason and "Traceback" not in reason for reason in reasons.values())
    # the ServerApp's last word, as the message of the exception that fails the run in Flower (Flower then
    # prints its exit code): scripts read the last "OSCAR status:" line of the stream
    status_lines = [line for line in log.splitlines() if "OSCAR status:" in line]
    assert "RunFailed: OSCAR status: failed — NotEnoughClientsError: 0 valid uploads" in status_lines[-1]
