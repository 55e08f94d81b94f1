"""The one-shot strategy's rules that need no processes: waiting for nodes, rejections named in one line,
min-clients, finished runs left alone, resumed clients found by name on new node ids."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors import safe_open

from oscar_common.config import OscarConfig
from oscar_common.dp_calibration import MECHANISM, NEIGHBOURING, gaussian_sigma, mean_sensitivity
from oscar_common.run_config import main as run_config_main
from oscar_common.wire import (
    EVALUATE_MESSAGE_TYPE,
    IDENTIFY_MESSAGE_TYPE,
    TRAIN_MESSAGE_TYPE,
    ClientFailure,
    DpRecord,
    Evaluation,
    Identity,
    Upload,
    model_record,
    upload_content,
)
from oscar_server import strategy as strategy_module
from oscar_server.outcomes import ClientOutcome, Rejection
from oscar_server.report import build_report
from oscar_server.run_dir import FinishedRunError, RunDirectory
from oscar_server.strategy import NotEnoughClientsError, OscarStrategy

RAY_TRACEBACK = ("\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1234)\nTraceback (most recent call last):\n"
                 '  File "/x/client_app.py", line 40, in train\n    raise ValueError(msg)\n'
                 "ValueError: no readable training images\n")


class FakeGrid:
    """Just enough of a Flower Grid: connected node ids (which may change), and replies to identify queries."""

    def __init__(self, nodes: list[int] | list[list[int]], names: dict[int, str] | None = None) -> None:
        self.views = iter(nodes) if nodes and isinstance(nodes[0], list) else itertools.repeat(nodes)
        self.names = names or {}
        self.sent: list[Message] = []
        self._ids = itertools.count(1)
        self._pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(next(self.views))

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        self.most_outstanding = max(getattr(self, "most_outstanding", 0), len(self._pending) + len(messages))
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do before storing it
            self._pending[message_id] = message
            self.sent.append(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = []
        for message_id in message_ids:
            message = self._pending.pop(message_id)
            assert message.metadata.message_type == IDENTIFY_MESSAGE_TYPE
            node = message.metadata.dst_node_id
            replies.append(_reply(Identity(self.names[node]).to_record(), message_id, node))
        return replies


def _reply(content: RecordDict | None, to: str, node: int, error: str | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id=f"r-{to}", src_node_id=node, dst_node_id=0, reply_to_message_id=to,
                        group_id="", created_at=time.time(), ttl=60, message_type="train")
    if error is not None:
        return Message(metadata=metadata, error=Error(code=0, reason=error))
    return Message(metadata=metadata, content=content)


def _upload(name: str, encoder: str) -> Upload:
    return Upload(class_ids=np.array([0]), means=np.ones((1, 512), np.float32), scheme="pooled",
                  encoder_id=encoder, client_name=name)


@pytest.fixture
def strategy(tmp_path: Path, tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> OscarStrategy:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(strategy_module, "POLL_SECONDS", 0.01)
    for field in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has, for creating messages
        monkeypatch.setattr(TaskIdentity, field, 1)
    cfg = OscarConfig(class_names=("cat", "dog"), min_clients=3, wait_for_clients_timeout=0.5,
                      run_dir=str(tmp_path), run_name="unit")
    return OscarStrategy(cfg, RunDirectory.for_run(cfg, 1))


def test_waiting_for_nodes_times_out_and_logs_once_per_change(strategy: OscarStrategy,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.INFO, "oscar.server"), pytest.raises(NotEnoughClientsError,
                                                                      match="only 2 of min-clients=3 nodes"):
        strategy._wait_for_nodes(FakeGrid([[1]] * 5 + [[1, 2]] * 10_000), 3)
    assert time.monotonic() - started < 5
    waiting = [r.message for r in caplog.records if r.message.startswith("waiting for clients")]
    assert waiting == ["waiting for clients: 1 connected, 3 required", "waiting for clients: 2 connected, 3 required"]
    assert strategy._wait_for_nodes(FakeGrid([3, 1, 2]), 3) == [1, 2, 3]


def test_client_failures_are_rejected_under_the_clients_name_in_one_line(strategy: OscarStrategy) -> None:
    failure = ClientFailure(client_name="clipart", stage="upload",
                            reason="DataDirError: no folder of /data/clipart matches a class of this federation")
    strategy.accept_upload(_reply(failure.to_record(), "a", 11))
    strategy.accept_upload(_reply(None, "b", 12, error=RAY_TRACEBACK))
    first, second = strategy.state.rejected
    assert first == Rejection(node_id=11, name="clipart", round="upload",
                              reason="client failed: DataDirError: no folder of /data/clipart matches a class of "
                                     "this federation")
    assert second.reason == "client error: ValueError: no readable training images"


def test_too_few_valid_uploads_fail_the_run_before_any_synthesis(strategy: OscarStrategy) -> None:
    strategy.state.clients[7] = ClientOutcome(node_id=7, upload=_upload("only", strategy.cfg.text_encoder),
                                              upload_bytes=2048)
    strategy.state.rejected.append(Rejection(node_id=8, name="evil", reason="invalid payload: means contain NaN"))
    with pytest.raises(NotEnoughClientsError, match=r"1 valid uploads, min-clients is 3 \(rejected: evil: invalid"):
        strategy.aggregate_train(1, [])
    assert strategy.state.synthesis is None

    report = build_report(strategy.cfg, strategy.state, "NotEnoughClientsError: ...")
    assert report["status"] == "failed" and report["error"].startswith("NotEnoughClientsError")
    assert report["rejected"] == [{"node_id": 8, "name": "evil", "reason": "invalid payload: means contain NaN",
                                   "round": "upload"}]
    assert report["clients"][0]["name"] == "only" and report["clients"][0]["test_accuracy"] is None
    assert report["problems"] == ["evil: upload rejected: invalid payload: means contain NaN",
                                  "only: no evaluation: no reply"]


def test_min_uploads_waits_for_min_clients_nodes_and_needs_fewer_valid_uploads(
        strategy: OscarStrategy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes to wait for and uploads needed are two settings: wait for 3 nodes, go on with 2 valid uploads."""
    strategy = OscarStrategy(strategy.cfg.replace(min_uploads=2), strategy.run_dir)
    with pytest.raises(NotEnoughClientsError, match="only 2 of min-clients=3 nodes"):
        strategy.configure_train(1, None, None, FakeGrid([1, 2]))
    assert [m.metadata.dst_node_id for m in strategy.configure_train(1, None, None, FakeGrid([1, 2, 3]))] == [1, 2, 3]

    strategy.state.clients[1] = ClientOutcome(node_id=1, upload=_upload("a", strategy.cfg.text_encoder), upload_bytes=1)
    strategy.state.rejected.append(Rejection(node_id=3, name="evil", reason="invalid payload: means contain NaN"))
    with pytest.raises(NotEnoughClientsError, match=r"^1 valid uploads, min-uploads is 2 \(rejected: evil"):
        strategy.aggregate_train(1, [])

    class SynthesisStarted(Exception):
        pass

    def run_stage(stage: str, *args: object) -> None:
        raise SynthesisStarted(stage)

    monkeypatch.setattr(strategy_module, "run_stage", run_stage)
    strategy.state.clients[2] = ClientOutcome(node_id=2, upload=_upload("b", strategy.cfg.text_encoder), upload_bytes=1)
    with pytest.raises(SynthesisStarted, match="synthesis"):  # 2 of 3: enough
        strategy.aggregate_train(1, [])


@pytest.mark.parametrize("overrides, message", [
    ({"min-clients": 3, "min-uploads": 4}, "min-uploads (4) must be at most min-clients (3)"),
    ({"min-uploads": -1}, "min-uploads must be >= 0 (0: min-clients)"),
])
def test_min_uploads_out_of_range_is_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        OscarConfig.from_run_config(overrides)
    assert OscarConfig(min_clients=5).required_uploads == 5  # the default follows min-clients, as before


def test_a_finished_run_is_never_resumed(strategy: OscarStrategy) -> None:
    strategy.run_dir.report_json.write_text('{"status": "completed", "clients": ["kept"]}')
    with pytest.raises(FinishedRunError, match="already finished") as refused:
        strategy.start(FakeGrid([1, 2, 3]))
    assert strategy.run_dir.report_json.read_text() == '{"status": "completed", "clients": ["kept"]}'
    # the command it suggests works when typed
    suggested = shlex.split(re.search(r"`(oscar-config [^`]*)`", str(refused.value)).group(1))
    example = Path(__file__).resolve().parents[2] / "examples" / "demo-simulation.toml"
    out = strategy.run_dir.root.parent / "suggested.toml"
    argv = [str(example) if a == "YOUR.toml" else str(out) if a == "run.toml" else a for a in suggested[1:]]
    assert run_config_main(argv) == 0 and "run-name = \"NEW\"" in out.read_text()


def test_resumed_clients_are_found_by_name_on_new_node_ids(strategy: OscarStrategy) -> None:
    """A restarted simulation gives every client a new node id: the saved uploads follow the names."""
    encoder = strategy.cfg.text_encoder
    for node, name in ((101, "plain"), (102, "textured")):
        strategy.run_dir.save_payload(_upload(name, encoder), node)
    strategy.run_dir.save_upload_round([(101, "plain", 10), (102, "textured", 10)], [])
    assert strategy._resume_upload_round()
    grid = FakeGrid([7, 8, 9], names={7: "textured", 8: "stranger", 9: "plain"})
    strategy._find_resumed_clients(grid)
    assert {node: record.name for node, record in strategy.state.clients.items()} == {9: "plain", 7: "textured"}
    assert all(m.metadata.message_type == IDENTIFY_MESSAGE_TYPE for m in grid.sent)


def test_an_empty_class_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class-names is empty"):
        OscarStrategy(OscarConfig(run_dir=str(tmp_path)), RunDirectory(tmp_path))


class TrickleGrid(FakeGrid):
    """Nodes that answer one at a time, ``every`` seconds apart (a simulation's clients queued for a few
    Ray actors); ``silent`` nodes never answer."""

    def __init__(self, nodes: list[int], every: float, silent: set[int]) -> None:
        super().__init__(nodes, names={node: f"client-{node}" for node in nodes})
        self.every, self.silent = every, silent
        self.last = time.monotonic()

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        answering = [m for m in message_ids if self._pending[m].metadata.dst_node_id not in self.silent]
        if not answering or time.monotonic() - self.last < self.every:
            return []
        self.last = time.monotonic()
        return super().pull_messages(answering[:1])


@pytest.mark.parametrize("max_in_flight", [0, 2])
def test_replies_that_keep_coming_are_all_waited_for_and_a_silent_node_ends_the_round(
        strategy: OscarStrategy, max_in_flight: int) -> None:
    """Eight clients answering 0.1 s apart take 0.8 s, longer than the 0.3 s timeout: none of them is dropped,
    since every reply restarts the wait; the silent node is given up 0.3 s after the last reply. In waves of
    two it holds one of the two slots from the start, and the other eight go through the other one."""
    strategy = OscarStrategy(strategy.cfg.replace(max_in_flight=max_in_flight), strategy.run_dir)
    nodes = list(range(1, 10))
    grid = TrickleGrid(nodes, every=0.1, silent={1})
    messages = [Message(content=RecordDict(), dst_node_id=node, message_type=IDENTIFY_MESSAGE_TYPE) for node in nodes]
    started = time.monotonic()
    replies = strategy._send_and_collect(grid, messages, timeout=0.3, what="upload")
    elapsed = time.monotonic() - started
    assert sorted(reply.metadata.src_node_id for reply in replies) == list(range(2, 10))
    assert strategy.state.rejected == [Rejection(node_id=1, name=None,
                                                 reason="no upload reply, and none from any node for 0.3s")]
    assert 0.8 + 0.3 <= elapsed < 3
    assert grid.most_outstanding == (max_in_flight or len(nodes))


class ClientsGrid(FakeGrid):
    """Ten clients behind a few workers, as Flower's simulation engine runs them: each pull, up to ``workers``
    of the oldest outstanding messages are answered, in a shuffled order. Node 1 never answers the upload
    (a hung client), node 3 fails, node 5 uploads NaN means, node 8 never answers the evaluation."""

    def __init__(self, encoder: str, workers: int = 2, seed: int = 0) -> None:
        super().__init__(list(range(1, 11)))
        self.encoder, self.workers, self.rng = encoder, workers, np.random.default_rng(seed)

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        answering = [m for m in message_ids if self._answers(self._pending[m])][:self.workers]
        self.rng.shuffle(answering)
        return [self._answer(message_id, self._pending.pop(message_id)) for message_id in answering]

    def _answers(self, message: Message) -> bool:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        return not (node == 1 and kind == TRAIN_MESSAGE_TYPE or node == 8 and kind == EVALUATE_MESSAGE_TYPE)

    def _answer(self, message_id: str, message: Message) -> Message:
        node, name = message.metadata.dst_node_id, f"client-{message.metadata.dst_node_id}"
        if node == 3:
            return _reply(None, message_id, node, error=RAY_TRACEBACK)
        if message.metadata.message_type == EVALUATE_MESSAGE_TYPE:
            evaluation = Evaluation(client_name=name, accuracy=node / 20, num_examples=node, per_class={0: node / 20})
            return _reply(evaluation.to_record(), message_id, node)
        upload = _upload(name, self.encoder)
        upload.means = np.full((1, 512), np.nan if node == 5 else node, np.float32)
        return _reply(upload_content(upload), message_id, node)


def _safetensors(path: Path) -> tuple[dict, dict]:
    """A payload file's metadata and arrays (its bytes are not comparable: safetensors writes the metadata
    keys in no fixed order)."""
    with safe_open(path, framework="numpy") as handle:
        return handle.metadata(), {key: handle.get_tensor(key).tolist() for key in handle.keys()}


@pytest.mark.parametrize("max_in_flight", [1, 3, 10])
def test_the_rounds_in_waves_give_the_results_of_all_at_once(strategy: OscarStrategy, tmp_path: Path,
                                                              max_in_flight: int) -> None:
    """The upload and evaluation rounds for 10 clients (a hung one, a failing one, a bad upload, one that does
    not evaluate), as start() runs them: in waves of 1, 3 or 10, never more messages outstanding than that,
    each node asked once per round, and the same uploads, payload files, rejections and evaluations as all
    at once."""
    def rounds(wave: int) -> tuple[object, ...]:
        cfg = strategy.cfg.replace(max_in_flight=wave, min_clients=10, run_name=f"wave-{wave}")
        oscar = OscarStrategy(cfg, RunDirectory.for_run(cfg, 1))
        grid = ClientsGrid(cfg.text_encoder)
        oscar._send_and_collect(grid, list(oscar.configure_train(1, None, None, grid)), 0.2, "upload",
                                on_reply=oscar.accept_upload)
        broadcast = list(oscar.configure_evaluate(1, model_record(b"weights"), None, grid))
        metrics = oscar.aggregate_evaluate(1, oscar._send_and_collect(grid, broadcast, 0.2, "evaluation"))
        asked = sorted((m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent)
        clients = {c.node_id: (c.name, c.upload_bytes, c.download_bytes, c.evaluation, c.evaluation_error)
                   for c in oscar.state.clients.values()}
        payloads = {p.name: _safetensors(p) for p in oscar.run_dir.payloads_dir.iterdir()}
        rejected = sorted((r.node_id, r.name, r.reason) for r in oscar.state.rejected)
        return grid.most_outstanding, asked, clients, payloads, rejected, dict(metrics)

    most, *results = rounds(max_in_flight)
    all_most, *all_at_once = rounds(0)
    # given up, the hung node's and the silent evaluator's messages stay in Flower's store (until their TTL)
    assert max_in_flight <= most <= max_in_flight + 2 and all_most == 10
    assert results == all_at_once
    asked, clients, payloads, rejected, metrics = results
    assert asked == sorted([(TRAIN_MESSAGE_TYPE, n) for n in range(1, 11)]
                           + [(EVALUATE_MESSAGE_TYPE, n) for n in (2, 4, 6, 7, 8, 9, 10)])
    assert sorted(clients) == [2, 4, 6, 7, 8, 9, 10] and len(payloads) == 7
    assert clients[8][3:] == (None, "no evaluation reply, and none from any node for 0.2s")
    assert [r[0] for r in rejected] == [1, 3, 5] and "for 0.2s" in rejected[0][2]
    assert metrics["accuracy-mean"] == pytest.approx(np.mean([n / 20 for n in (2, 4, 6, 7, 9, 10)]))


def test_uploads_under_a_name_already_taken_get_their_node_id(strategy: OscarStrategy) -> None:
    encoder = strategy.cfg.text_encoder
    for node in (5, 6, 7):
        strategy.accept_upload(_reply(upload_content(_upload("plain", encoder)), f"u{node}", node))
    assert [c.name for c in strategy.state.clients.values()] == ["plain", "plain-6", "plain-7"]
    assert sorted(p.name for p in strategy.run_dir.payloads_dir.iterdir()) == [
        "plain-6.safetensors", "plain-7.safetensors", "plain.safetensors"]


def test_a_dp_record_that_does_not_add_up_is_a_named_rejection_and_the_others_proceed(
        strategy: OscarStrategy) -> None:
    encoder, minimum = strategy.cfg.text_encoder, strategy.cfg.min_images_per_class
    sensitivity = mean_sensitivity(clip_norm=1.0, min_images=minimum)
    honest = DpRecord(mechanism=MECHANISM, neighbouring=NEIGHBOURING, epsilon=2.0, delta=1e-5,
                      sigma=gaussian_sigma(2.0, 1e-5, sensitivity), sensitivity=sensitivity, clip_norm=1.0,
                      min_images=minimum)
    boastful = dataclasses.replace(honest, epsilon=0.5)  # claims epsilon 0.5 with the noise of epsilon 2
    for node, name, record in ((5, "honest", honest), (6, "boastful", boastful)):
        upload = dataclasses.replace(_upload(name, encoder), dp=record)
        strategy.accept_upload(_reply(upload_content(upload), f"u{node}", node))
    assert [c.name for c in strategy.state.clients.values()] == ["honest"]
    [rejection] = strategy.state.rejected
    assert (rejection.node_id, rejection.name) == (6, "boastful")
    assert rejection.reason.startswith("invalid payload: DP record: sigma ")
    assert "does not add up: epsilon 0.5" in rejection.reason


def test_the_log_the_metrics_and_the_report_give_the_same_totals(strategy: OscarStrategy,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Mean and overall accuracy are computed once (oscar_server.outcomes.tally): the strategy's log line and
    metrics and report.json say the same, and overall is correct predictions over test images."""
    cfg = strategy.cfg.replace(min_clients=10)
    oscar = OscarStrategy(cfg, strategy.run_dir)
    grid = ClientsGrid(cfg.text_encoder)
    oscar._send_and_collect(grid, list(oscar.configure_train(1, None, None, grid)), 0.2, "upload",
                            on_reply=oscar.accept_upload)
    broadcast = list(oscar.configure_evaluate(1, model_record(b"weights"), None, grid))
    with caplog.at_level(logging.INFO, "oscar.server"):
        metrics = oscar.aggregate_evaluate(1, oscar._send_and_collect(grid, broadcast, 0.2, "evaluation"))
    evaluated = (2, 4, 6, 7, 9, 10)  # node n answers accuracy n / 20 on n test images; node 8 never answers
    overall = sum(n / 20 * n for n in evaluated) / sum(evaluated)
    assert metrics["accuracy-weighted"] == pytest.approx(overall)
    assert metrics["accuracy-mean"] == pytest.approx(sum(n / 20 for n in evaluated) / len(evaluated))
    report = build_report(cfg, oscar.state)
    assert report["accuracy"] == {"mean": metrics["accuracy-mean"], "weighted": metrics["accuracy-weighted"]}
    assert (f"6 of 7 clients evaluated: overall accuracy {overall:.4f} (correct / test images, 38 images), "
            f"mean over clients {metrics['accuracy-mean']:.4f}") in caplog.text
