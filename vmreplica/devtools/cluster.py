"""A real Apache Kafka broker on demand, for the demo, the tests and first steps.

`vmreplica broker up` takes the pinned Kafka 4.x jars (:mod:`vmreplica.devtools.jars`), formats
KRaft storage and starts one or three combined broker+controller nodes on loopback. Everything
it starts is recorded under ``$VMREPLICA_HOME/broker`` so that ``down`` stops exactly that and
nothing else.

Three nodes can stand in three named sites (``broker up --brokers 3 --sites a,b,c``): each node's
``broker.rack`` is its site, so Kafka places a topic's three replicas one per site, and with
``min.insync.replicas`` 2 and a KRaft quorum of three, losing any one site loses no committed
record and leaves a working cluster — the stretched deployment, on one machine.

Production deployments point vmreplica at their own cluster with ``VMREPLICA_BOOTSTRAP_SERVERS``.

About 500 lines: one local cluster's whole life (properties, format, start, readiness, node
stop and restart for fault tests, down); the secured broker's certificates and settings are
:mod:`vmreplica.security.broker`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vmreplica.devtools.jars import deploy_dir, home_dir, require_program, resolve_kafka
from vmreplica.devtools.ports import cluster_ports, port_free
from vmreplica.domain.names import check_name
from vmreplica.errors import BrokerError, ConfigurationError
from vmreplica.security.broker import SecuredBroker
from vmreplica.storage.safefile import replace_atomically

if TYPE_CHECKING:
    from vmreplica.journal.kafka import KafkaConnection

DEFAULT_BROKER_PORT: Final = 19092
"""Not 9092, so a Kafka the user already runs is left alone."""
STARTUP_TIMEOUT_SECONDS: Final = 120.0
"""A cold JVM on a busy two-core machine can take most of a minute to elect a controller."""
SHUTDOWN_TIMEOUT_SECONDS: Final = 30.0
JVM_HEAP: Final = "-Xmx768m"
"""Enough for test traffic; three nodes still fit beside the test suite."""
NODE_MARKER: Final = "vmreplica.devtools.cluster.node"
"""A system property on every JVM we start, so a recycled pid is never mistaken for ours."""
ERROR_LINES_QUOTED: Final = 20
"""How many lines of a failed node's server.log a start-up error quotes: the last few whole
ERROR entries, enough for Kafka's chain of causes (a bind failure takes four)."""
ROUTED_PORT_OFFSET: Final = 2
"""A node's routed listener is its broker port + 2, advertised at + 3 (see :func:`routed_ports`)."""
_LOG_ENTRY: Final = re.compile(r"^\[[^]]+\] (?P<level>[A-Z]+) ")
"""The start of one entry in deploy/kafka/log4j2.yaml's pattern, ``[%d] %p %m (%c)%n``."""


@dataclass(frozen=True)
class NodeState:
    """One JVM we started."""

    node_id: int
    pid: int
    broker_port: int
    controller_port: int
    directory: str
    routed_port: int | None = None
    """The node's second listener (``up(..., routed=True)``), where a proxy forwards to."""
    routed_advertised_port: int | None = None
    """Where that listener is advertised: the proxy's port, which the caller listens on."""
    rack: str | None = None
    """The site the node stands in (its ``broker.rack``), in a stretched cluster."""


@dataclass(frozen=True)
class ClusterState:
    """What ``up`` started; written to ``broker/state.json``."""

    cluster_id: str
    bootstrap_servers: str
    nodes: tuple[NodeState, ...]
    secure_folder: str | None = None
    """The secured cluster's certificates and passwords (:class:`SecuredBroker`); None: plain."""

    @property
    def routed_bootstrap_servers(self) -> str | None:
        """The advertised addresses of the routed listener, if the cluster has one: a client
        bootstrapped there is told only those addresses, so all its traffic takes that route."""
        ports = [node.routed_advertised_port for node in self.nodes]
        if None in ports:
            return None
        return ",".join(f"127.0.0.1:{port}" for port in ports)

    @classmethod
    def load(cls, path: Path) -> ClusterState | None:
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        nodes = tuple(NodeState(**node) for node in raw["nodes"])
        return cls(raw["cluster_id"], raw["bootstrap_servers"], nodes, raw.get("secure_folder"))

    @property
    def secured(self) -> SecuredBroker | None:
        return None if self.secure_folder is None else SecuredBroker(Path(self.secure_folder))

    def connection(self, client_id: str = "vmreplica-broker") -> KafkaConnection:
        """A connection to this cluster, as its admin when it is secured."""
        from vmreplica.journal.kafka import KafkaConnection  # noqa: PLC0415 — keeps `down` light

        secured = self.secured
        if secured is None:
            return KafkaConnection(self.bootstrap_servers, client_id)
        return KafkaConnection(self.bootstrap_servers, client_id, security=secured.admin_security())

    def save(self, path: Path) -> None:
        text = json.dumps(asdict(self), indent=2)

        def write(temporary: Path) -> None:
            temporary.write_text(text)

        replace_atomically(path, write)


def _ours(pid: int) -> bool:
    """True when ``pid`` is alive and is one of our broker JVMs (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return NODE_MARKER.encode() in cmdline


def _port_open(port: int) -> bool:
    """True when something accepts connections on ``port`` (a broker that has come up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def routed_ports(broker_port: int) -> tuple[int, int]:
    """A node's routed listener and the port it is advertised at, in the node's port block
    (:data:`~vmreplica.devtools.ports.PORT_STRIDE_PER_NODE` ports, two taken by Kafka)."""
    return broker_port + ROUTED_PORT_OFFSET, broker_port + ROUTED_PORT_OFFSET + 1


def _properties(
    node_id: int,
    brokers: int,
    base_port: int,
    directory: Path,
    secured: SecuredBroker | None,
    routed: bool = False,
    rack: str | None = None,
) -> str:
    ports = cluster_ports(base_port, brokers)
    broker_port, controller_port = ports[2 * (node_id - 1) : 2 * node_id]
    voters = ",".join(f"{i + 1}@127.0.0.1:{ports[2 * i + 1]}" for i in range(brokers))
    replication = min(brokers, 3)
    listeners = f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}"
    advertised = f"PLAINTEXT://127.0.0.1:{broker_port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if routed:
        port, advertised_port = routed_ports(broker_port)
        listeners += f",ROUTED://127.0.0.1:{port}"
        advertised += f",ROUTED://127.0.0.1:{advertised_port}"
        protocols += ",ROUTED:PLAINTEXT"
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters,
        "listeners": listeners,
        "advertised.listeners": advertised,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": protocols,
        "log.dirs": str(directory / "data"),
        "num.partitions": "1",
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(max(1, replication - 1)),
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(max(1, replication - 1)),
        "group.initial.rebalance.delay.ms": "0",
        # Journal records carry up to a few MiB of compressed disk data per record.
        "message.max.bytes": str(16 * 1024 * 1024),
        "replica.fetch.max.bytes": str(16 * 1024 * 1024),
        "auto.create.topics.enable": "false",
        "log.segment.bytes": str(256 * 1024 * 1024),
    }
    if rack is not None:
        lines["broker.rack"] = rack
    if secured is not None:
        lines.update(secured.properties(broker_port, controller_port))
    return "".join(f"{key}={value}\n" for key, value in lines.items())


class LocalCluster:
    """The Kafka nodes this machine runs for vmreplica, under ``$VMREPLICA_HOME/broker``."""

    def __init__(self, home: Path | None = None, base_port: int | None = None) -> None:
        self.root = (home or home_dir()) / "broker"
        port = base_port or int(os.environ.get("VMREPLICA_BROKER_PORT", DEFAULT_BROKER_PORT))
        self.base_port = port
        self.state_file = self.root / "state.json"

    def state(self) -> ClusterState | None:
        return ClusterState.load(self.state_file)

    def running(self) -> bool:
        state = self.state()
        return state is not None and all(_ours(node.pid) for node in state.nodes)

    def status(self) -> dict[str, object]:
        """What ``broker status --json`` prints."""
        state = self.state()
        if state is None:
            return {"running": False, "bootstrap_servers": None, "nodes": []}
        secured = state.secured
        nodes = [
            {
                "node_id": n.node_id,
                "pid": n.pid,
                "alive": _ours(n.pid),
                "port": n.broker_port,
                "site": n.rack,
                "log": str(Path(n.directory) / "logs" / "server.log"),
            }
            for n in state.nodes
        ]
        return {
            "running": all(bool(n["alive"]) for n in nodes),
            "bootstrap_servers": state.bootstrap_servers,
            "cluster_id": state.cluster_id,
            "nodes": nodes,
            "security_protocol": "PLAINTEXT" if secured is None else "SASL_SSL",
            "sasl_mechanism": None if secured is None else "SCRAM-SHA-512",
            "ca_file": None if secured is None else str(secured.ca_file),
            "admin_properties": None if secured is None else str(secured.admin_properties),
        }

    def up(
        self,
        brokers: int = 1,
        *,
        secure: bool = False,
        routed: bool = False,
        sites: Sequence[str] | None = None,
    ) -> ClusterState:
        """Start ``brokers`` nodes (1 or 3) and return once every one answers.

        ``secure``: TLS on every listener, SCRAM logins and ACLs (:mod:`vmreplica.security.broker`).
        Idempotent: when the same cluster is already running it is returned as is.
        ``routed`` gives every node a second listener, advertised at another port of its block
        (:func:`routed_ports`): a client bootstrapped at
        :attr:`ClusterState.routed_bootstrap_servers` reaches the cluster only through whatever
        the caller runs on those ports (a test's proxy, to cut one site's link to Kafka).
        ``sites``: one site name per node, its ``broker.rack`` (a stretched cluster).

        :raises PrerequisiteMissingError: Java, Maven or the jars are unavailable.
        :raises BrokerError: a node died or did not answer in time; its log is named.
        """
        if secure and routed:
            raise ConfigurationError(
                "a routed listener (for a test's proxy) is made for plain clusters only; "
                "start the cluster with either secure or routed"
            )
        if brokers not in (1, 3):
            raise BrokerError(f"--brokers must be 1 or 3, not {brokers}")
        racks = _racks(brokers, sites)
        existing = self.state()
        if existing is not None and self.running():
            if (
                tuple(node.rack for node in existing.nodes) == racks
                and (existing.secured is not None) == secure
            ):
                return existing
            kind = "secured " if existing.secured is not None else ""
            raise BrokerError(
                f"a {kind}{len(existing.nodes)}-node cluster is already running at "
                f"{existing.bootstrap_servers}; run `vmreplica broker down` first"
            )
        resolve_kafka()  # before anything is removed: a missing prerequisite changes nothing
        if existing is not None:
            self.down()
        ports = cluster_ports(self.base_port, brokers)
        if routed:
            ports += [p for port in ports[::2] for p in routed_ports(port)]
        for port in ports:
            if not port_free(port):
                raise BrokerError(
                    f"port {port} on 127.0.0.1 is already in use; choose another base port "
                    "with VMREPLICA_BROKER_PORT or `vmreplica broker up --port N`"
                )
        cluster_id = _cluster_id()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        secured = SecuredBroker(self.root / "secure") if secure else None
        if secured is not None:
            secured.prepare()
        nodes = []
        processes = []
        for node_id in range(1, brokers + 1):
            directory = self.root / f"node-{node_id}"
            (directory / "logs").mkdir(parents=True)
            properties = directory / "server.properties"
            rack = racks[node_id - 1]
            text = _properties(node_id, brokers, self.base_port, directory, secured, routed, rack)
            properties.touch(mode=0o600)  # a secured node's holds its SCRAM password
            properties.write_text(text)
            formatted = subprocess.run(
                [
                    *_jvm(node_id, directory),
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(properties),
                    "--ignore-formatted",
                    *(secured.format_arguments() if secured is not None else []),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if formatted.returncode != 0:
                said = formatted.stderr[-2000:]
                if secured is not None:
                    said = secured.scrub(said)
                raise BrokerError(f"formatting KRaft storage failed:\n{said}")
            process = _launch(node_id, directory)
            processes.append(process)
            broker_port, controller_port = cluster_ports(self.base_port, brokers)[
                2 * (node_id - 1) : 2 * node_id
            ]
            routed_port, advertised_port = routed_ports(broker_port) if routed else (None, None)
            nodes.append(
                NodeState(
                    node_id,
                    process.pid,
                    broker_port,
                    controller_port,
                    str(directory),
                    routed_port,
                    advertised_port,
                    rack,
                )
            )
        state = ClusterState(
            cluster_id,
            ",".join(f"127.0.0.1:{node.broker_port}" for node in nodes),
            tuple(nodes),
            None if secured is None else str(secured.folder),
        )
        state.save(self.state_file)
        try:
            self._wait_ready(state, processes)
        except BaseException:
            for process in processes:
                process.kill()
                process.wait()
            self.state_file.unlink(missing_ok=True)
            raise
        return state

    def nodes_at(self, site: str) -> list[int]:
        """The ids of the nodes standing in ``site`` (a stretched cluster's ``broker.rack``).

        :raises BrokerError: no node stands there.
        """
        state = self._require_state()
        found = [node.node_id for node in state.nodes if node.rack == site]
        if not found:
            racks = sorted({node.rack for node in state.nodes if node.rack is not None})
            raise BrokerError(
                f"no Kafka node stands in site {site!r}; the cluster's sites are "
                f"{', '.join(racks) or 'not named (start it with --sites)'}"
            )
        return found

    def stop_nodes(self, node_ids: Sequence[int] | None = None, *, kill: bool = False) -> None:
        """Stop some nodes (all by default) and keep their data, so :meth:`start_nodes` brings
        them back as they were: how a test takes a broker away. ``kill`` sends SIGKILL (a
        crash) instead of SIGTERM (a controlled shutdown)."""
        state = self._require_state()
        pids = [
            node.pid
            for node in state.nodes
            if (node_ids is None or node.node_id in node_ids) and _ours(node.pid)
        ]
        _stop(pids, signal.SIGKILL if kill else signal.SIGTERM)

    def start_nodes(self) -> ClusterState:
        """Start again every node of the cluster that is not running, on its data, and return
        once the whole cluster answers.

        :raises BrokerError: a node died or did not answer in time; its log is named.
        """
        state = self._require_state()
        nodes = []
        processes = []
        for node in state.nodes:
            if not _ours(node.pid):
                process = _launch(node.node_id, Path(node.directory))
                processes.append(process)
                node = replace(node, pid=process.pid)  # noqa: PLW2901 — the restarted node
            nodes.append(node)
        state = replace(state, nodes=tuple(nodes))
        state.save(self.state_file)
        self._wait_ready(state, processes)
        return state

    def _require_state(self) -> ClusterState:
        state = self.state()
        if state is None:
            raise BrokerError(f"no cluster was started under {self.root}; run `broker up` first")
        return state

    def _wait_ready(self, state: ClusterState, processes: list[subprocess.Popen[bytes]]) -> None:
        from vmreplica.journal.kafka import count_brokers  # noqa: PLC0415 — keeps `broker down` light

        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            by_pid = {node.pid: node for node in state.nodes}
            for process in processes:
                if process.poll() is not None:
                    node = by_pid[process.pid]
                    raise BrokerError(
                        f"Kafka node {node.node_id} exited during start-up; "
                        + _what_node_said(Path(node.directory) / "logs")
                    )
            if all(_port_open(node.broker_port) for node in state.nodes):
                try:
                    if count_brokers(state.connection()) >= len(state.nodes):
                        return
                except BrokerError:
                    pass
            if time.monotonic() > deadline:
                said = "; ".join(
                    f"node {node.node_id}: " + _what_node_said(Path(node.directory) / "logs")
                    for node in state.nodes
                )
                raise BrokerError(
                    f"Kafka did not answer within {STARTUP_TIMEOUT_SECONDS:.0f} s; {said}"
                )
            time.sleep(0.5)

    def down(self) -> list[int]:
        """Stop every node ``up`` started and return their pids; harmless when nothing runs."""
        state = self.state()
        if state is None:
            return []
        pids = [node.pid for node in state.nodes if _ours(node.pid)]
        _stop(pids, signal.SIGTERM)
        self.state_file.unlink(missing_ok=True)
        return pids


def _racks(brokers: int, sites: Sequence[str] | None) -> tuple[str | None, ...]:
    """Each node's ``broker.rack``: the site it stands in, or None for every node.

    :raises ConfigurationError: sites named for a single node, not one per node, invalid or twice.
    """
    if not sites:
        return (None,) * brokers
    if brokers != 3 or len(sites) != brokers:
        raise ConfigurationError(
            f"--sites names the site of each of the 3 nodes of a stretched cluster (got "
            f"{len(sites)} for {brokers} node{'s' * (brokers > 1)}); use --brokers 3 --sites A,B,C"
        )
    for site in sites:
        check_name("site", site)
    if len(set(sites)) != len(sites):
        raise ConfigurationError(
            f"--sites {','.join(sites)} names a site twice: a stretched cluster puts one node in "
            "each of three sites, so that losing one site leaves two"
        )
    return tuple(sites)


def _jvm(node_id: int, directory: Path) -> list[str]:
    """The JVM command line of a node, up to its main class."""
    libs = resolve_kafka()
    java = require_program("java", "Java 17 or newer")
    log_config = deploy_dir() / "kafka" / "log4j2.yaml"
    return [
        java,
        JVM_HEAP,
        "-XX:+UseG1GC",
        f"-D{NODE_MARKER}={node_id}",
        f"-Dlog4j2.configurationFile={log_config}",
        f"-Dkafka.logs.dir={directory / 'logs'}",
        "-cp",
        f"{libs}/*",
    ]


def _launch(node_id: int, directory: Path) -> subprocess.Popen[bytes]:
    """Start a node on its formatted storage, in its own session, output to its logs."""
    with (directory / "logs" / "stdout.log").open("ab") as out:
        return subprocess.Popen(
            [*_jvm(node_id, directory), "kafka.Kafka", str(directory / "server.properties")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(pids: Sequence[int], signum: int) -> None:
    """Signal our nodes ``pids``, SIGKILL those still up after the shutdown timeout, and return
    once all are gone."""
    for pid in pids:
        os.kill(pid, signum)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_SECONDS
    while any(_ours(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _ours(pid):
            os.kill(pid, signal.SIGKILL)
    while any(_ours(pid) for pid in pids):
        time.sleep(0.1)


def _what_node_said(logs: Path) -> str:
    """Kafka's own account of a failed start: the last ERROR and FATAL entries of server.log.

    Each entry keeps its message and exception lines (``Caused by`` included) but not the stack
    frames, so a bind failure reads as Kafka wrote it; whole entries are quoted, newest last, up
    to ``ERROR_LINES_QUOTED`` lines. Without such entries, the tail of the JVM's stdout stands in
    (a JVM that died before logging started, say).
    """
    server_log = logs / "server.log"
    entries: list[list[str]] = []
    keep = False
    text = server_log.read_text(errors="replace") if server_log.is_file() else ""
    for line in text.splitlines():
        start = _LOG_ENTRY.match(line)
        if start is not None:
            keep = start["level"] in ("ERROR", "FATAL")
            if keep:
                entries.append([line])
        elif keep and line.strip() and not line.lstrip().startswith(("at ", "...")):
            entries[-1].append(line)
    quoted: list[str] = []
    for entry in reversed(entries):
        if quoted and len(quoted) + len(entry) > ERROR_LINES_QUOTED:
            break
        quoted[:0] = entry[:ERROR_LINES_QUOTED]
    if quoted:
        return f"Kafka logged these errors (in {server_log}):\n" + "\n".join(quoted)
    stdout_log = logs / "stdout.log"
    tail = stdout_log.read_text(errors="replace")[-2000:].strip() if stdout_log.is_file() else ""
    return (
        f"{server_log} holds no error; its output ends:\n{tail}"
        if tail
        else f"it logged no error; see {logs}"
    )


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.

    Kafka's storage tool reads an id starting with '-' as an option, so such ids are redrawn.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
