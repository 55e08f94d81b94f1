"""OSCAR as a Flower strategy: one upload round, server-side synthesis and training, one broadcast.

Flower's ``Strategy.start`` loop fits OSCAR with ``num_rounds=1`` (whatever ``aggregate_train``
returns is what ``configure_evaluate`` sends), but OSCAR needs things it does not give:

* waiting for ``min-clients`` with a timeout (``sample_nodes`` waits forever), and then needing
  ``min-uploads`` valid uploads of them (Flower's min_available_nodes vs. the replies a round needs);
* handling each upload the moment it arrives (validated and persisted), not after the last one;
* broadcasting the final model only to the clients whose upload was accepted, with a timeout,
  so one dead client cannot hang the run;
* sending in waves of ``max-in-flight`` messages: Flower scans its whole message store for each node
  it polls, so a message for each of 1,000 nodes at once costs 1,000 x 1,000 per sweep;
* resuming a run whose upload round is over, on nodes that may carry new ids (a restarted
  simulation or SuperNode): clients are matched by the name they give, never by node id.

So :meth:`OscarStrategy.start` drives the same four hooks itself with a push/pull loop. Every message
and reply is built and read through :mod:`oscar_common.wire`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from oscar_common.config import OscarConfig
from oscar_common.models.loading import text_embedding_dim
from oscar_common.training.recipes import eval_preprocessing
from oscar_common.wire import (
    EVALUATE_MESSAGE_TYPE,
    IDENTIFY_MESSAGE_TYPE,
    TRAIN_MESSAGE_TYPE,
    ClientFailure,
    EvaluateInstruction,
    Evaluation,
    Expectation,
    Identity,
    PayloadError,
    claimed_name,
    evaluate_content,
    model_record,
    one_line,
    parse_upload,
    train_content,
    wire_size,
)
from oscar_server.outcomes import ClientOutcome, Rejection, tally
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.launcher import run_stage
from oscar_server.stages.stage import SYNTHESIS, TRAINING
from oscar_server.stages.synthesize import SynthesisSummary
from oscar_server.stages.train import TrainingSummary

log = logging.getLogger("oscar.server")
POLL_SECONDS = 1.0


class NotEnoughClientsError(RuntimeError):
    """Fewer than ``min-clients`` nodes connected, or fewer valid uploads than ``min-uploads``."""


@dataclass
class RunState:
    """Everything the report needs, filled in as the run goes."""

    clients: dict[int, ClientOutcome] = field(default_factory=dict)  # by node id: the accepted uploads
    rejected: list[Rejection] = field(default_factory=list)
    synthesis: SynthesisSummary | None = None
    training: TrainingSummary | None = None
    resumed: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class OscarStrategy(Strategy):
    def __init__(self, cfg: OscarConfig, run_dir: RunDirectory) -> None:
        if not cfg.class_names:
            raise ValueError("class-names is empty: set the class list, e.g. "
                             "--run-config \"class-names='cat,dog,horse'\"")
        self.cfg = cfg
        self.run_dir = run_dir
        self.state = RunState()
        self.instruction = cfg.train_instruction()
        # Reading the encoder's config first also fails the run at once if the model is missing here.
        self._expect = Expectation.of(self.instruction, max_bytes=cfg.max_payload_bytes,
                                      feature_dim=text_embedding_dim(cfg.scheme, cfg.client_encoder_id))
        self._handled: set[str] = set()  # reply message ids already handled
        self._accepted_names: set[str] = set()  # client names of accepted uploads (payload file names)
        # message id -> node it was sent to: an error reply made by the SuperLink for a dead node
        # carries the SuperLink as sender, so the recipient of the original message is the truth.
        self._recipients: dict[str, int] = {}

    # ------------------------------------------------------------------ Flower Strategy hooks
    def summary(self) -> None:
        log.info("OSCAR: scheme=%s, %d classes, %d images/class/client, guidance %.2f, %d steps, device %s, "
                 "%s process(es)", self.cfg.scheme, len(self.cfg.class_names), self.cfg.images_per_class,
                 self.cfg.guidance_scale, self.cfg.num_inference_steps, self.cfg.device, self.cfg.num_processes)
        log.info("OSCAR: run directory %s", self.run_dir.root)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self._wait_for_nodes(grid, self.cfg.min_clients)
        log.info("sending the encode instruction to %d nodes", len(nodes))
        return [Message(content=train_content(self.instruction), dst_node_id=node, message_type=TRAIN_MESSAGE_TYPE)
                for node in nodes]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for reply in replies:
            self.accept_upload(reply)
        accepted = list(self.state.clients.values())
        if len(accepted) < self.cfg.required_uploads:
            needed = (f"min-uploads is {self.cfg.min_uploads}" if self.cfg.min_uploads
                      else f"min-clients is {self.cfg.min_clients}")
            raise NotEnoughClientsError(f"{len(accepted)} valid uploads, {needed}"
                                        + _rejections_hint(self.state.rejected))

        # The stages read the accepted uploads from the run dir, in client-name order: the result does not
        # depend on arrival order, and a user can rerun either stage by hand (oscar-synthesize, oscar-train).
        started = time.monotonic()
        self.state.synthesis = run_stage(SYNTHESIS, self.run_dir, self.cfg)
        self.state.timings["synthesis"] = time.monotonic() - started

        started = time.monotonic()
        self.state.training = run_stage(TRAINING, self.run_dir, self.cfg)
        self.state.timings["training"] = time.monotonic() - started
        blob = self.run_dir.model_path.read_bytes()
        return model_record(blob), MetricRecord({"train-accuracy": float(self.state.training.train_accuracy)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        preprocessing = eval_preprocessing(self.cfg.classifier_image_size, self.cfg.train_recipe)
        instruction = EvaluateInstruction(class_names=self.cfg.class_names, seed=self.cfg.seed,
                                          image_size=self.cfg.classifier_image_size,
                                          preprocessing=preprocessing.to_config())
        content = evaluate_content(instruction, arrays)
        size = wire_size(content)
        connected = set(grid.get_node_ids())
        messages = []
        for node_id, client in sorted(self.state.clients.items(), key=lambda item: item[1].name):
            if node_id not in connected:  # e.g. gone while the server was synthesising, or before a resume
                client.not_evaluated("not connected when the model was broadcast")
                log.warning("client %s (node %s) is not connected: no model sent", client.name, node_id)
                continue
            client.download_bytes = size
            messages.append(Message(content=content, dst_node_id=node_id, message_type=EVALUATE_MESSAGE_TYPE))
        log.info("broadcasting the trained model (%d bytes) to %d clients", size, len(messages))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        for reply in replies:
            client = self.state.clients.get(self._sender(reply))
            if client is None:
                continue
            self._take_evaluation(reply, client)
            if client.evaluation is None:
                log.warning("client %s (node %s) did not evaluate: %s", client.name, client.node_id,
                            client.evaluation_error)
            else:
                log.info("client %s (node %s): test accuracy %.4f on %d images", client.name, client.node_id,
                         client.evaluation.accuracy, client.evaluation.num_examples)
        totals = tally(self.state.clients.values(), self.state.rejected)
        if totals.mean_accuracy is None:
            log.warning("no client evaluated the model (%d accepted uploads)", totals.clients)
            return None
        overall = "—" if totals.weighted_accuracy is None else f"{totals.weighted_accuracy:.4f}"
        log.info("%d of %d clients evaluated: overall accuracy %s (correct / test images, %d images), mean over "
                 "clients %.4f", totals.evaluated, totals.clients, overall, totals.test_images, totals.mean_accuracy)
        metrics = {"accuracy-mean": totals.mean_accuracy}
        if totals.weighted_accuracy is not None:  # None: the clients that answered had no test images
            metrics["accuracy-weighted"] = totals.weighted_accuracy
        return MetricRecord(metrics)

    # ------------------------------------------------------------------ one-shot driver
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 1,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Callable | None = None) -> RunState:
        """Run the single OSCAR round. Returns the run state (also on partial failure, via ``self.state``)."""
        if num_rounds != 1:
            raise ValueError("OSCAR is one-shot: num_rounds must be 1")
        self.summary()
        if self._resume_upload_round():
            self._find_resumed_clients(grid)
        else:
            train_messages = list(self.configure_train(1, initial_arrays or ArrayRecord(),
                                                       train_config or ConfigRecord(), grid))
            started = time.monotonic()
            self._send_and_collect(grid, train_messages, self.cfg.train_timeout, "upload",
                                   on_reply=self.accept_upload)
            self.state.timings["upload"] = time.monotonic() - started
            self.run_dir.save_upload_round(
                [(c.node_id, c.name, c.upload_bytes) for c in self.state.clients.values()], self.state.rejected)
        arrays, _ = self.aggregate_train(1, [])  # every reply was handled as it arrived

        eval_messages = list(self.configure_evaluate(1, arrays, evaluate_config or ConfigRecord(), grid))
        started = time.monotonic()
        replies = self._send_and_collect(grid, eval_messages, self.cfg.evaluate_timeout, "evaluation")
        self.state.timings["evaluation"] = time.monotonic() - started
        self.aggregate_evaluate(1, replies)
        return self.state

    def _resume_upload_round(self) -> bool:
        """Take the uploads of a finished upload round from the run dir instead of asking again."""
        self.run_dir.refuse_if_finished()
        saved = self.run_dir.load_upload_round()
        if saved is None:
            return False
        if not self.cfg.resume:
            raise RuntimeError(f"{self.run_dir.root} already holds a finished upload round: set resume=true "
                               "to continue that run, or choose another run-name")
        accepted, rejected = saved
        for upload, node_id, upload_bytes in accepted:
            self.state.clients[node_id] = ClientOutcome(node_id=node_id, upload=upload, upload_bytes=upload_bytes)
        self.state.rejected = rejected
        self.state.resumed = True
        log.info("resuming %s: %d uploads from the run dir, no new upload round (%d rejected before)",
                 self.run_dir.root, len(accepted), len(rejected))
        return True

    def _find_resumed_clients(self, grid: Grid) -> None:
        """Node ids can change between runs (a restarted SuperNode, a new simulation): ask the connected
        nodes who they are and attach each saved upload to the node that now carries its client name."""
        wanted = len(self.state.clients)
        nodes = self._wait_for_nodes(grid, wanted, required=False)
        if {record.node_id for record in self.state.clients.values()} <= set(nodes):
            return  # the same nodes as before
        messages = [Message(content=RecordDict(), dst_node_id=node, message_type=IDENTIFY_MESSAGE_TYPE)
                    for node in nodes]
        names: dict[str, int] = {}
        for reply in self._send_and_collect(grid, messages, min(60.0, self.cfg.evaluate_timeout), "identify"):
            if not reply.has_error():
                try:
                    names[Identity.from_content(reply.content).client_name] = self._sender(reply)
                except PayloadError:
                    continue
        records = list(self.state.clients.values())
        self.state.clients = {}
        for record in records:
            record.node_id = names.get(record.name, record.node_id)
            self.state.clients[record.node_id] = record
        log.info("resumed clients found on the connected nodes: %s",
                 ", ".join(f"{r.name} -> node {r.node_id}" if r.name in names else f"{r.name} (not connected)"
                           for r in records))

    def accept_upload(self, reply: Message) -> None:
        """Validate one upload and persist it at once; a bad one is logged and rejected."""
        if reply.metadata.message_id in self._handled:
            return
        self._handled.add(reply.metadata.message_id)
        node_id = self._sender(reply)
        if reply.has_error():
            log.debug("node %s replied with an error:\n%s", node_id, reply.error.reason)
            self._reject(node_id, f"client error: {one_line(reply.error.reason)}")
            return
        failure = ClientFailure.from_content(reply.content)
        if failure is not None:
            self._reject(node_id, f"client failed: {failure.reason}", failure.client_name)
            return
        try:
            upload = parse_upload(reply.content, self._expect)
        except PayloadError as exc:
            self._reject(node_id, f"invalid payload: {exc}", claimed_name(reply.content))
            return
        if upload.client_name in self._accepted_names:  # a set: 100 uploads, not 100 x 100 comparisons
            upload.client_name = f"{upload.client_name}-{node_id}"  # names must be unique on disk
        self._accepted_names.add(upload.client_name)
        record = ClientOutcome(node_id=node_id, upload=upload, upload_bytes=wire_size(reply.content))
        self.state.clients[node_id] = record
        path = self.run_dir.save_payload(upload, node_id)
        log.info("accepted upload from node %s (%s): %d classes, means %s, %d bytes%s -> %s", node_id,
                 upload.client_name, len(upload.classes), upload.feature_shape, record.upload_bytes,
                 f", DP epsilon {upload.dp.epsilon:g}" if upload.dp else "", path.name)

    # ------------------------------------------------------------------ helpers
    def _take_evaluation(self, reply: Message, client: ClientOutcome) -> None:
        """The client's evaluation as it sent it, or why there is none."""
        if reply.has_error():
            log.debug("client %s's evaluation raised:\n%s", client.name, reply.error.reason)
            client.not_evaluated(one_line(reply.error.reason))
            return
        failure = ClientFailure.from_content(reply.content)
        if failure is not None:
            client.not_evaluated(failure.reason)
            return
        try:
            client.evaluation = Evaluation.from_content(reply.content, len(self.cfg.class_names))
        except PayloadError as exc:
            client.not_evaluated(f"invalid evaluation reply: {exc}")
            return
        client.evaluation_error = None

    def _sender(self, reply: Message) -> int:
        return self._recipients.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _reject(self, node_id: int, reason: str, name: str | None = None, in_round: str = "upload") -> None:
        log.warning("rejected node %s%s: %s", node_id, f" ({name})" if name else "", reason)
        self.state.rejected.append(Rejection(node_id=node_id, name=name, reason=reason, round=in_round))

    def _wait_for_nodes(self, grid: Grid, count: int, required: bool = True) -> list[int]:
        """Until ``count`` nodes are connected; past the timeout, fail (``required``) or go on with those there."""
        deadline = time.monotonic() + self.cfg.wait_for_clients_timeout
        last_seen = -1
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                if not required:
                    log.warning("only %d of %d nodes connected within %.0fs; going on with them", len(nodes),
                                count, self.cfg.wait_for_clients_timeout)
                    return nodes
                raise NotEnoughClientsError(
                    f"only {len(nodes)} of min-clients={count} nodes connected within "
                    f"{self.cfg.wait_for_clients_timeout:.0f}s (wait-for-clients-timeout)")
            if len(nodes) != last_seen:  # one line per change, not one per poll
                log.info("waiting for clients: %d connected, %d required", len(nodes), count)
                last_seen = len(nodes)
            time.sleep(POLL_SECONDS)

    def _send_and_collect(self, grid: Grid, messages: list[Message], timeout: float, what: str,
                          on_reply: Callable[[Message], None] | None = None) -> list[Message]:
        """Send the messages ``max-in-flight`` at a time, the next one as each reply (or failure) comes in,
        and return the replies; ``on_reply`` handles each as it arrives.

        Why waves: Flower's SuperLink keeps every message it was given in one store, and each node's poll
        (a SuperNode's, or the simulation engine's sweep over all its virtual nodes every 0.1 s) scans that
        whole store: N messages at once for N nodes cost N x N per sweep, which at 1,000 virtual clients
        took a core and slowed the round 5x per client. At most ``max-in-flight`` outstanding keeps it N x
        max-in-flight (0: all at once).

        Timeouts count from the last reply: a message is given up when ``timeout`` seconds passed without
        any reply since it was sent (a simulation runs its clients a few at a time, so a deadline counted from
        the first push would drop the last ones of a large federation however healthy they are). Its slot
        then goes to the next node: silent nodes cost the round ``timeout`` per wave of them, never the rest.
        """
        wave = self.cfg.max_in_flight or len(messages)
        unsent = deque(messages)
        in_flight: dict[str, tuple[int, float]] = {}  # message id -> (node, when it was sent)
        replies: list[Message] = []
        last_reply = -math.inf
        if len(messages) > wave:
            log.info("%s round: %d messages, at most %d outstanding (max-in-flight)", what, len(messages), wave)
        while unsent or in_flight:
            if unsent and len(in_flight) < wave:
                self._push(grid, [unsent.popleft() for _ in range(min(wave - len(in_flight), len(unsent)))],
                           in_flight, what)
                if not in_flight:
                    continue  # none of them could be sent (each failure recorded): on to the next ones
            pulled = grid.pull_messages(list(in_flight))
            now = time.monotonic()
            for reply in pulled:
                if in_flight.pop(reply.metadata.reply_to_message_id, None) is None:
                    continue  # not ours, or already given up
                last_reply = now
                replies.append(reply)
                if on_reply is not None:
                    on_reply(reply)
            for message_id, (node_id, sent) in list(in_flight.items()):
                if now - max(sent, last_reply) >= timeout:
                    del in_flight[message_id]
                    # one wording whatever the wave size: the same run gives the same report
                    self._no_reply(node_id, f"no {what} reply, and none from any node for {timeout:g}s", what)
            if in_flight and not (pulled and unsent):  # a reply frees a slot: refill at once, else wait
                time.sleep(POLL_SECONDS)
        return replies

    def _push(self, grid: Grid, batch: list[Message], in_flight: dict[str, tuple[int, float]], what: str) -> None:
        """Push ``batch``; each message the SuperLink took goes in flight, each it refused is a failure."""
        accepted = {message_id for message_id in grid.push_messages(batch) if message_id}
        sent = time.monotonic()
        for message in batch:
            node_id, message_id = message.metadata.dst_node_id, message.metadata.message_id
            if message_id in accepted:  # the grid sets the id; a refused message's is not returned
                in_flight[message_id] = (node_id, sent)
                self._recipients[message_id] = node_id
            else:
                self._no_reply(node_id, f"the SuperLink refused the {what} message (node gone?)", what)

    def _no_reply(self, node_id: int, reason: str, what: str) -> None:
        """A node that did not answer: a missing identity, a missing evaluation, or a rejected upload."""
        if what == "identify":
            log.warning("node %s: %s", node_id, reason)
        elif node_id in self.state.clients:  # uploaded, but did not evaluate
            self.state.clients[node_id].not_evaluated(reason)
            log.warning("client %s (node %s): %s", self.state.clients[node_id].name, node_id, reason)
        else:
            self._reject(node_id, reason, in_round=what)


def _rejections_hint(rejected: list[Rejection]) -> str:
    """The first rejection reasons, so the failure line says why without opening the report."""
    if not rejected:
        return ""
    shown = "; ".join(f"{r.sender}: {r.reason}" for r in rejected[:3])
    return f" (rejected: {shown}{' ...' if len(rejected) > 3 else ''})"

