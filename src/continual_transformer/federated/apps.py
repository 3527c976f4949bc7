"""The Flower ServerApp and ClientApp: one task learned across clients that keep their texts.

    flwr run <app folder> <federation>       # SuperLink + SuperNodes (`server_app`, `client_app`)
    simulate(FederatedConfig(...), clients=4) # Flower's simulation engine (Ray), in one process

The server first asks every connected client for its shard's labels and size (a client whose
shard fails validation answers with the error, file and line, and does not join), then runs
`rounds` rounds of `TaskStrategy` (FedAvg weighted by examples; FedProx with `mu` > 0) over the
joined clients, and adds the finished task to the model directory (`merge.Federation.finish`).
`analytic` needs one round. Settings come from the run config (`FederatedConfig`); a client's
shard from its node config (`shard="path"`) or, in a simulation, `shards[partition-id]`.

Importing this module imports Flower (extra: federated); nothing else in the package does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

from ..extras import import_extra

import_extra("flwr", "federated")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from .local import (  # noqa: E402
    client_learner, learn_locally, read_shard, spec_from_json, spec_json)
from .merge import Federation  # noqa: E402

# A child of Flower's logger: its handlers print it in a ServerApp process, and `flwr run --stream` shows it.
log = logging.getLogger("flwr.continual_transformer")


@dataclass(frozen=True)
class FederatedConfig:
    """A federated run's settings: Flower's run config (`[tool.flwr.app.config]`, `flwr run
    --run-config`), flat names with dashes there, underscores here.

    `model` is the model directory the task joins (created with `method`, `backbone`, ...
    when it has no model yet). `rounds` rounds of `epochs` local epochs (default: the model's);
    `mu` > 0 adds FedProx's proximal term. A round needs `min_clients` usable replies, waits
    `round_timeout` seconds for them, and starts when `min_available` clients are connected.
    `test`: a stream file with the task's test split, evaluated on the server after each
    round. `shards`: comma-separated shard files, client i (partition-id) reads the i-th.
    """

    model: str = "federated-model"
    task: str = ""
    rounds: int = 5
    epochs: int = 0  # 0: the model's epochs
    mu: float = 0.0
    min_clients: int = 2
    min_available: int = 2
    round_timeout: float = 600.0
    test: str = ""
    shards: str = ""
    max_train: int = 0  # per client; 0: all its texts
    method: str = "ia3"
    backbone: str = "default"
    max_length: int = 128
    adapt_layers: int = 0  # 0: the default
    lr: float = 0.0  # 0: the default
    head_lr: float = 0.0
    batch_size: int = 0
    precision: str = "auto"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("task: name the task to learn")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: the model's), got {self.epochs!r}")
        if not self.mu >= 0:
            raise ValueError(f"mu must be >= 0, got {self.mu!r}")
        if not 1 <= self.min_clients <= self.min_available:
            raise ValueError(f"need 1 <= min_clients <= min_available, got {self.min_clients!r} "
                             f"and {self.min_available!r}")
        if not self.round_timeout > 0:
            raise ValueError(f"round_timeout must be > 0, got {self.round_timeout!r}")
        if self.method not in ("ia3", "analytic"):
            raise ValueError(f"method must be 'ia3' or 'analytic', got {self.method!r}")

    def run_config(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, config: dict) -> "FederatedConfig":
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown run config {key!r}; known: "
                                 f"{sorted(k.replace('_', '-') for k in known)}")
            default = getattr(cls, name)
            values[name] = type(default)(value)
        return cls(**values)

    def shard_list(self) -> list[str]:
        return [s for s in self.shards.split(",") if s]


# -- the server ------------------------------------------------------------------------------
def open_model(config: FederatedConfig):
    """The learner of `config.model`: loaded when the directory holds a model, else new."""
    from ..config import BackboneConfig, LearnerSpec, TrainConfig
    from ..io.checkpoint import read_manifest
    from ..learner import ContinualLearner

    directory = Path(config.model)
    try:
        read_manifest(directory)
    except Exception:  # noqa: BLE001 - no model there yet (any other fault shows on save)
        exists = False
    else:
        exists = True
    if exists:
        learner = ContinualLearner.load(directory, device=config.device)
        if learner.method.name != config.method:
            raise ValueError(f"{directory} holds a {learner.method.name!r} model; method "
                             f"{config.method!r} was asked for")
        return learner
    backbone = BackboneConfig(config.backbone, max_length=config.max_length)
    if config.method == "analytic":
        return ContinualLearner.from_spec(LearnerSpec(backbone, "analytic", {"seed": config.seed}),
                                          device=config.device)
    train = {"seed": config.seed, "precision": config.precision,
             **{k: getattr(config, k) for k in ("lr", "head_lr", "batch_size", "epochs")
                if getattr(config, k)}}
    return ContinualLearner.from_spec(LearnerSpec(backbone, "ia3", {
        "train": TrainConfig(**train).to_dict(), "adapt_layers": config.adapt_layers or None}),
        device=config.device)


class TaskStrategy(FedAvg):
    """FedAvg over the joined clients of one task, with every reply checked first.

    Each client gets its own message (the global tensors, and whether the server still needs
    its statistics); `merge.Federation.aggregate` refuses a reply of the wrong shapes, with
    NaN or Inf, and counts a client that sent no reply or an error; the refused are logged with
    the client's node id and shard and never averaged in. A round with fewer than
    `min_clients` usable replies fails the run (the model is not changed)."""

    def __init__(self, federation: Federation, clients: dict[int, str], *, min_clients: int,
                 mu: float = 0.0):
        super().__init__(fraction_evaluate=0.0, min_train_nodes=min_clients,
                         min_available_nodes=min_clients)
        self.federation, self.clients, self.min_clients, self.mu = federation, clients, min_clients, mu
        self.bytes_sent: dict[int, list[int]] = {}  # per round: bytes each accepted reply carried

    def summary(self) -> None:
        log.info("task %r over %d clients %s; min_clients %d; proximal mu %g",
                 self.federation.task, len(self.clients), sorted(self.clients.values()),
                 self.min_clients, self.mu)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = []
        for node, name in self.clients.items():
            own = ConfigRecord({**dict(config), "server-round": server_round,
                                "proximal-mu": self.mu,
                                "statistics": self.federation.needs_statistics(name)})
            messages.append(Message(RecordDict({"arrays": arrays, "config": own}),
                                    dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        failures, usable, answered = [], [], set()
        for message in replies:
            node = message.metadata.src_node_id
            answered.add(node)
            name = self.clients.get(node, f"node {node}")
            if message.has_error():
                failures.append((name, f"client {name} failed: {message.error.reason}"))
                continue
            content = message.content
            tensors = content["arrays"].to_torch_state_dict() if "arrays" in content else {}
            examples = content["metrics"]["num-examples"] if "metrics" in content else None
            usable.append((name, tensors, examples if isinstance(examples, int) else None))
            self.bytes_sent.setdefault(server_round, []).append(
                sum(t.numel() * t.element_size() for t in tensors.values()))
        for node, name in self.clients.items():
            if node not in answered:
                failures.append((name, f"client {name} sent no reply within the round's timeout"))
        try:
            trained = self.federation.aggregate(server_round, usable, failures, self.min_clients)
        finally:
            for refusal in self.federation.refusals:
                if refusal.round == server_round:
                    log.warning("round %d: refused %s", server_round, refusal.reason)
        accepted = self.federation.rounds[-1]["accepted"]
        log.info("round %d: averaged %d clients %s", server_round, len(accepted), accepted)
        return ArrayRecord(dict(trained)), MetricRecord({"accepted": len(accepted)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


def _client_name(node: int, reply: ConfigRecord) -> str:
    return f"node {node} ({reply['shard']})"


def join_clients(grid: Grid, config: FederatedConfig) -> tuple[dict[int, str], tuple[str, ...]]:
    """Ask every connected client for its shard's labels; those that answer join. Returns
    (node id -> client name, the task's labels: the union of theirs)."""
    deadline = time.monotonic() + config.round_timeout
    while len(nodes := list(grid.get_node_ids())) < config.min_available:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} clients connected, fewer than min_available="
                               f"{config.min_available}, after {config.round_timeout:g} s")
        time.sleep(1)
    ask = ConfigRecord({"task": config.task, "max-train": config.max_train, "seed": config.seed})
    messages = [Message(RecordDict({"config": ask}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    clients, labels = {}, set()
    for message in grid.send_and_receive(messages, timeout=config.round_timeout):
        node = message.metadata.src_node_id
        if message.has_error():
            log.warning("client node %d does not join: %s", node, message.error.reason)
            continue
        reply = message.content["shard"]
        clients[node] = _client_name(node, reply)
        labels.update(reply["labels"])
        log.info("client %s joins: %d texts, labels %s", clients[node], reply["examples"],
                 list(reply["labels"]))
    if len(clients) < config.min_clients:
        raise RuntimeError(f"{len(clients)} clients joined, fewer than min_clients={config.min_clients}")
    return clients, tuple(sorted(labels))


@dataclass
class FederatedResult:
    """What a federated run did: the task's record, the test accuracy after each round (when
    a test file was given), bytes each client sent per round, and the refusals."""

    record: dict
    accuracy_per_round: dict[int, float]
    bytes_per_client_round: dict[int, list[int]]
    refused: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def run_server(grid: Grid, config: FederatedConfig) -> FederatedResult:
    """The server's whole run (what `server_app` does): join, rounds, finish."""
    learner = open_model(config)
    clients, labels = join_clients(grid, config)
    federation = Federation(learner, config.task, labels)
    test_task = _test_task(config) if config.test else None
    strategy = TaskStrategy(federation, clients, min_clients=config.min_clients, mu=config.mu)
    accuracy: dict[int, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if test_task is None or server_round == 0:
            return None
        accuracy[server_round] = federation.evaluate(test_task)
        log.info("round %d: test accuracy %.4f", server_round, accuracy[server_round])
        return MetricRecord({"accuracy": accuracy[server_round]})

    train_config = ConfigRecord({"task": config.task, "labels": list(labels),
                                 "spec": spec_json(learner.spec()),
                                 "backbone-sha256": learner.backbone.ref.sha256,
                                 "epochs": config.epochs, "max-train": config.max_train,
                                 "seed": config.seed})
    strategy.start(grid, ArrayRecord(dict(federation.trained)),
                   num_rounds=1 if federation.one_round else config.rounds,
                   timeout=config.round_timeout, train_config=train_config, evaluate_fn=evaluate)
    record = federation.finish(config.model, {"federated_test_accuracy": accuracy} if accuracy else None)
    log.info("task %r learned from %d clients (%d texts) and saved to %s", record.name,
             record.stats["federated"]["clients"], record.train_examples, config.model)
    return FederatedResult(record.to_dict(), accuracy, strategy.bytes_sent,
                           record.stats["federated"]["refused"])


def _test_task(config: FederatedConfig):
    from ..data.source import load_tasks

    for task in load_tasks(config.test, seed=config.seed):
        if task.name == config.task:
            return task
    raise ValueError(f"{config.test}: no task {config.task!r} to test on")


def make_server_app(config: FederatedConfig | None = None,
                    on_result: Callable[[FederatedResult], None] | None = None) -> ServerApp:
    """A ServerApp running `run_server` with `config` (None: from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, config or FederatedConfig.from_run_config(dict(context.run_config)))
        if on_result is not None:
            on_result(result)

    return app


# -- the client ------------------------------------------------------------------------------
def shard_path(context: Context, config: FederatedConfig | None) -> str:
    """This client's shard: its node config's `shard`, else `shards[partition-id]`."""
    node = dict(context.node_config)
    if "shard" in node:
        return str(node["shard"])
    shards = (config or FederatedConfig.from_run_config(dict(context.run_config))).shard_list()
    if "partition-id" not in node:
        raise ValueError("this client has no shard: start it with --node-config 'shard=\"PATH\"'")
    index = int(node["partition-id"])
    if index >= len(shards):
        raise ValueError(f"client {index} has no shard: {len(shards)} shards given")
    return shards[index]


def _shard(path: str, ask: ConfigRecord):
    shard = read_shard(path, str(ask["task"]), int(ask["seed"]))
    return shard.subsample_train(int(ask["max-train"]) or None, int(ask["seed"]))


def query_reply(message: Message, context: Context, config: FederatedConfig | None = None) -> Message:
    """Validate this client's shard (a bad row raises, naming file and line) and say its labels."""
    path = shard_path(context, config)
    shard = _shard(path, message.content["config"])
    labels = sorted({e.label for e in shard.train})
    return Message(RecordDict({"shard": ConfigRecord({
        "shard": Path(path).name, "labels": labels, "examples": len(shard.train)})}), reply_to=message)


def train_reply(message: Message, context: Context, config: FederatedConfig | None = None) -> Message:
    """One round on this client's shard: the tensors it trained (and, when asked, its
    statistics), and its number of training texts."""
    ask = message.content["config"]
    shard = _shard(shard_path(context, config), ask)
    learner = client_learner(spec_from_json(str(ask["spec"])), str(ask["backbone-sha256"]))
    start = message.content["arrays"].to_torch_state_dict()
    update = learn_locally(
        learner, shard, tuple(ask["labels"]),
        start={k[len("trained/"):]: v for k, v in start.items()} or None,
        epochs=int(ask["epochs"]) or None, mu=float(ask["proximal-mu"]),
        server_round=int(ask["server-round"]), statistics=bool(ask["statistics"]))
    metrics = {"num-examples": update.examples}
    if update.loss is not None:
        metrics["train-loss"] = float(update.loss)
    return Message(RecordDict({"arrays": ArrayRecord(update.tensors),
                               "metrics": MetricRecord(metrics)}), reply_to=message)


def make_client_app(config: FederatedConfig | None = None) -> ClientApp:
    """A ClientApp answering the server's queries and training rounds (`config`: the
    simulation's settings; None: the run config and the node config)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return query_reply(message, context, config)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_reply(message, context, config)

    return app


server_app = make_server_app()
client_app = make_client_app()


# -- the simulation engine ---------------------------------------------------------------------
def simulate(config: FederatedConfig, clients: int, *, client_app_: ClientApp | None = None,
             cpus: int = 2, cpus_per_client: float = 1.0) -> FederatedResult:
    """Run the server and `clients` clients in Flower's simulation engine (Ray, on `cpus`
    CPUs, each client taking `cpus_per_client`); client i reads `config.shards`' i-th file."""
    from flwr.simulation import run_simulation

    if len(config.shard_list()) != clients:
        raise ValueError(f"{clients} clients but {len(config.shard_list())} shards: {config.shards!r}")
    results: list[FederatedResult] = []
    run_simulation(
        server_app=make_server_app(config, results.append),
        client_app=client_app_ or make_client_app(config),
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"num_cpus": cpus, "num_gpus": 0,
                                      "include_dashboard": False, "log_to_driver": True}},
    )
    if not results:
        raise RuntimeError("the federated simulation ended without a result; see the log above")
    return results[0]


def simulate_stream(stream: str | Path, config: FederatedConfig, clients: int, out: str | Path, *,
                    alpha: float = 0.5, union_max_train: int | None = None,
                    cpus: int = 2, cpus_per_client: float = 1.0) -> FederatedResult:
    """Cut `config.task` of `stream` (at most `union_max_train` training texts, stratified)
    into `clients` label-skewed shards (`out/shards/`), learn it in the simulation engine into
    `out/model` (unless `config.model` names another directory), tested on the stream's test
    split; the result also goes to `out/result.json`."""
    import json
    from dataclasses import replace

    from ..data.source import load_tasks
    from .shards import label_skewed, write_shards

    out = Path(out)
    tasks = {t.name: t for t in load_tasks(stream, seed=config.seed)}
    if config.task not in tasks:
        raise ValueError(f"{stream}: no task {config.task!r}; tasks: {list(tasks)}")
    task = tasks[config.task].subsample_train(union_max_train, config.seed)
    paths = write_shards(task, label_skewed(task, clients, alpha, config.seed), out / "shards")
    model = config.model if config.model != FederatedConfig.model else str(out / "model")
    config = replace(config, model=model, shards=",".join(str(p) for p in paths),
                     test=config.test or str(stream), min_available=max(config.min_available, clients))
    result = simulate(config, clients, cpus=cpus, cpus_per_client=cpus_per_client)
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result
