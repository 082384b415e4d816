"""Run a real single-node Apache Kafka broker (KRaft) from Maven Central jars, for development.

No Docker engine is needed: Maven resolves the broker from ``pom.xml`` beside this file into a
git-ignored cache, and the broker runs on the local JVM bound to 127.0.0.1. Standard library only,
so it works before the project's virtualenv exists.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("LOCALKAFKA_CACHE", REPO / ".cache" / "kafka"))
POM = HERE / "pom.xml"
DEFAULT_PORT = 19092
HOST = "127.0.0.1"

# Brokers started by this process: kept so they can be reaped (no zombie, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


class LauncherError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why."""


@dataclass(frozen=True)
class Broker:
    port: int
    pid: int
    run_dir: Path

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"


def kafka_version() -> str:
    text = POM.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)]


def lib_dir() -> Path:
    return CACHE / f"lib-{kafka_version()}"


def fetch(*, quiet: bool = True) -> Path:
    """Resolve the broker's jars with Maven into the cache, once; return the folder."""
    target = lib_dir()
    marker = target / ".complete"
    if marker.exists():
        return target
    if shutil.which("mvn") is None:
        raise LauncherError("Maven (mvn) is not on PATH; it is needed once to resolve the Kafka jars")
    if shutil.which("java") is None:
        raise LauncherError("java is not on PATH; the local Kafka broker runs on the JVM (17+)")
    shutil.rmtree(target, ignore_errors=True)
    cmd = [
        "mvn",
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={target}",
        "-DincludeScope=runtime",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LauncherError(f"Maven could not resolve Kafka {kafka_version()}:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
    marker.write_text(kafka_version())
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    """Kafka's Uuid string form: 16 random bytes, URL-safe base64 without padding. Like Kafka's own
    ``Uuid.randomUuid()`` it never starts with '-', which the storage tool would read as an option
    (one start in 64 failed that way)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _run_dir(port: int) -> Path:
    return CACHE / f"run-{port}"


@dataclass(frozen=True)
class TlsListener:
    """An extra SSL listener: ``keystore_pem`` holds the broker's private key (PKCS#8, unencrypted)
    followed by its certificate chain, as Kafka's PEM keystore type reads it."""

    port: int
    keystore_pem: Path


@dataclass(frozen=True)
class SaslPlainListener:
    """An extra SASL_PLAINTEXT listener with the PLAIN mechanism and these users (name -> password).

    With ``authorize`` the broker enforces Kafka ACLs: the standard KRaft authorizer, nothing
    allowed without an ACL (``allow.everyone.if.no.acl.found=false``), ``super_users`` (e.g.
    ``"User:admin"``) exempt. The broker's own connections (controller and inter-broker listeners)
    then authenticate over SASL as ``User:localkafka``, a super user with a password made per
    start, so the PLAINTEXT listener's anonymous principal needs no rights: it is refused
    everything, and an ACL is the only way in.
    """

    port: int
    users: tuple[tuple[str, str], ...] = field(repr=False)
    authorize: bool = False
    super_users: tuple[str, ...] = ()


def _properties(
    port: int, controller_port: int, data_dir: Path, tls: TlsListener | None = None, sasl: SaslPlainListener | None = None,
    *, node_id: int = 1, voters: str | None = None, replication: int = 1,
) -> str:
    listeners = f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}"
    advertised = f"PLAINTEXT://{HOST}:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if tls is not None:
        listeners += f",SSL://{HOST}:{tls.port}"
        advertised += f",SSL://{HOST}:{tls.port}"
        protocols += ",SSL:SSL"
    if sasl is not None:
        listeners += f",SASL_PLAINTEXT://{HOST}:{sasl.port}"
        advertised += f",SASL_PLAINTEXT://{HOST}:{sasl.port}"
        protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        if sasl.authorize:
            protocols = protocols.replace("CONTROLLER:PLAINTEXT", "CONTROLLER:SASL_PLAINTEXT")
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters or f"{node_id}@{HOST}:{controller_port}",
        "listeners": listeners,
        "advertised.listeners": advertised,
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": protocols,
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Topics are created by the software with the right settings; an auto-created topic hides a bug.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "default.replication.factor": str(replication),
        # A write acknowledged by all in-sync replicas is on two brokers at least once there are three.
        "min.insync.replicas": str(min(2, replication)),
        "offsets.topic.replication.factor": str(replication),
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min(2, replication)),
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": str(min(2, replication)),
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.backoff.ms": "1000",
    }
    if sasl is not None:
        settings.update(_sasl_settings(sasl))
    if tls is not None:
        settings["listener.name.ssl.ssl.keystore.type"] = "PEM"
        settings["listener.name.ssl.ssl.keystore.location"] = str(tls.keystore_pem)
    return "".join(f"{k}={v}\n" for k, v in settings.items())


_BROKER_USER = "localkafka"
_PLAIN = "org.apache.kafka.common.security.plain.PlainLoginModule required"


def _sasl_settings(sasl: SaslPlainListener) -> dict[str, str]:
    """PLAIN users on the SASL listener; with ``authorize``, the authorizer and the broker's own
    SASL identity on its controller and inter-broker connections."""
    for name, password in sasl.users:
        if not name.replace("-", "").replace("_", "").isalnum() or name == _BROKER_USER:
            raise LauncherError(f"SASL user names must be letters, digits, '-' or '_' and not {_BROKER_USER!r}")
        if any(char in password for char in '"\\;') or not password.isprintable():
            raise LauncherError(f"the password of SASL user {name!r} must be printable, without '\"', '\\' or ';'")
    users = " ".join(f'user_{name}="{password}"' for name, password in sasl.users)
    settings = {"sasl.enabled.mechanisms": "PLAIN"}
    if not sasl.authorize:
        settings["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = f"{_PLAIN} {users};"
        return settings
    # The broker talks to its own controller and to itself as a super user, over SASL; clients of
    # the PLAINTEXT listener are User:ANONYMOUS, which no ACL names.
    password = secrets.token_urlsafe(24)
    own = f'username="{_BROKER_USER}" password="{password}" user_{_BROKER_USER}="{password}"'
    settings.update({
        "listener.name.sasl_plaintext.plain.sasl.jaas.config": f"{_PLAIN} {own} {users};",
        "listener.name.controller.plain.sasl.jaas.config": f"{_PLAIN} {own};",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": ";".join((f"User:{_BROKER_USER}", *sasl.super_users)),
    })
    return settings


_LOG4J = """\
rootLogger.level=WARN
rootLogger.appenderRef.out.ref=OUT
appender.out.type=Console
appender.out.name=OUT
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=WARN
logger.started.name=kafka.server.KafkaRaftServer
logger.started.level=INFO
"""


def _java(libs: Path, log4j: Path, heap: str) -> list[str]:
    return [
        "java",
        f"-Xmx{heap}",
        "-Xms128m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs}/*",
    ]


def metadata_ready(port: int, timeout: float = 2.0) -> bool:
    """True when the broker answers a Metadata request naming at least one live broker."""
    # Metadata v4 (non-flexible): client id header, all topics (-1), no auto-creation.
    header = struct.pack(">hhih", 3, 4, 7, len(b"localkafka")) + b"localkafka"
    body = struct.pack(">ib", -1, 0)
    request = struct.pack(">i", len(header) + len(body)) + header + body
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(request)
            size = struct.unpack(">i", _recv_exact(s, 4))[0]
            payload = _recv_exact(s, size)
    except OSError:
        return False
    correlation_id, _throttle, broker_count = struct.unpack(">iii", payload[:12])
    return correlation_id == 7 and broker_count >= 1


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as dead: reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def running(port: int = DEFAULT_PORT) -> Broker | None:
    run_dir = _run_dir(port)
    pid_file = run_dir / "broker.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().strip() or 0)
    return Broker(port, pid, run_dir) if pid and _pid_alive(pid) else None


def start(
    port: int | None = DEFAULT_PORT,
    *,
    heap: str = "768m",
    timeout: float = 90.0,
    fresh: bool = True,
    tls: TlsListener | None = None,
    sasl: SaslPlainListener | None = None,
) -> Broker:
    """Start a broker on 127.0.0.1:port (a free port when None); return once it answers metadata.

    With ``fresh=False`` an existing log directory for that port is kept, so a stopped broker can
    be restarted with its data (used by tests that take the broker away and bring it back).
    """
    port = port or _free_port()
    existing = running(port)
    if existing:
        return existing
    libs = fetch()
    run_dir = _run_dir(port)
    data_dir = run_dir / "data"
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    props = run_dir / "server.properties"
    log4j = run_dir / "log4j2.properties"
    controller_port_file = run_dir / "controller.port"
    if controller_port_file.exists():
        controller_port = int(controller_port_file.read_text())
    else:
        controller_port = _free_port()
        controller_port_file.write_text(str(controller_port))
    props.touch(mode=0o600)
    props.chmod(0o600)  # before writing: it can hold SASL passwords
    props.write_text(_properties(port, controller_port, data_dir, tls, sasl))
    log4j.write_text(_LOG4J)
    java = _java(libs, log4j, heap)
    if not (data_dir / "meta.properties").exists():
        fmt = subprocess.run(
            [*java, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props)],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            if fresh:  # nothing to keep, and its properties can hold SASL passwords
                shutil.rmtree(run_dir, ignore_errors=True)
            raise LauncherError(f"formatting the KRaft log directory failed:\n{fmt.stdout}{fmt.stderr}")
    log_path = run_dir / "broker.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*java, "kafka.Kafka", str(props)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    (run_dir / "broker.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LauncherError(f"the broker exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
        if metadata_ready(port):
            return Broker(port, proc.pid, run_dir)
        time.sleep(0.2)
    _terminate(proc.pid)
    raise LauncherError(f"the broker did not answer metadata within {timeout:.0f}s; log tail:\n{_tail(log_path)}")


@dataclass
class Cluster:
    """N brokers on 127.0.0.1, each a KRaft controller too (a quorum of N), replication N."""

    ports: list[int]
    run_dirs: list[Path]
    pids: dict[int, int] = field(default_factory=dict)  # node id -> pid of the running ones

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"{HOST}:{port}" for port in self.ports)

    def node_of_port(self, port: int) -> int:
        return self.ports.index(port) + 1

    def kill(self, node_id: int) -> None:
        """SIGKILL one broker: no controlled shutdown, as a crash or a lost machine."""
        pid = self.pids.pop(node_id)
        os.kill(pid, signal.SIGKILL)
        child = _children.pop(pid, None)
        if child is not None:
            child.wait()

    def restart(self, node_id: int, timeout: float = 90.0) -> None:
        """Start a killed broker again on its data; return once it answers metadata."""
        run_dir = self.run_dirs[node_id - 1]
        java = _java(fetch(), run_dir / "log4j2.properties", "512m")
        self.pids[node_id] = _launch(java, run_dir)
        _await_ready(self.ports[node_id - 1], _children[self.pids[node_id]], run_dir / "broker.log", timeout)

    def stop(self) -> None:
        for pid in list(self.pids.values()):
            _terminate(pid)
        self.pids.clear()
        for run_dir in self.run_dirs:
            shutil.rmtree(run_dir, ignore_errors=True)


def start_cluster(size: int = 3, *, heap: str = "512m", timeout: float = 120.0) -> Cluster:
    """Start ``size`` brokers (each also a controller voter) on free ports of 127.0.0.1, one cluster
    id formatted into every log directory; return once every broker answers metadata."""
    libs = fetch()
    ports = [_free_port() for _ in range(size)]
    controller_ports = [_free_port() for _ in range(size)]
    voters = ",".join(f"{node}@{HOST}:{cport}" for node, cport in enumerate(controller_ports, start=1))
    cluster_id = _cluster_id()
    cluster = Cluster(ports, [_run_dir(port) for port in ports])
    try:
        for node, (port, cport, run_dir) in enumerate(zip(ports, controller_ports, cluster.run_dirs, strict=True), 1):
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            props = run_dir / "server.properties"
            props.write_text(_properties(port, cport, run_dir / "data", node_id=node, voters=voters, replication=size))
            (run_dir / "log4j2.properties").write_text(_LOG4J)
            java = _java(libs, run_dir / "log4j2.properties", heap)
            fmt = subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                                 capture_output=True, text=True, check=False)
            if fmt.returncode != 0:
                raise LauncherError(f"formatting broker {node} failed:\n{fmt.stdout}{fmt.stderr}")
            cluster.pids[node] = _launch(java, run_dir)
        for node, port in enumerate(ports, start=1):
            run_dir = cluster.run_dirs[node - 1]
            _await_ready(port, _children[cluster.pids[node]], run_dir / "broker.log", timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _launch(java: list[str], run_dir: Path) -> int:
    with open(run_dir / "broker.log", "ab") as log:
        proc = subprocess.Popen([*java, "kafka.Kafka", str(run_dir / "server.properties")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _children[proc.pid] = proc
    (run_dir / "broker.pid").write_text(str(proc.pid))
    return proc.pid


def _await_ready(port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LauncherError(f"the broker on {port} exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
        if metadata_ready(port):
            return
        time.sleep(0.2)
    raise LauncherError(f"the broker on {port} did not answer metadata within {timeout:.0f}s; log tail:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _terminate(pid: int, grace: float = 20.0) -> None:
    child = _children.pop(pid, None)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if child is not None:
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _pid_alive(pid):
        time.sleep(0.05)


def stop(port: int = DEFAULT_PORT, *, clean: bool = True) -> bool:
    """Stop the broker on ``port`` by its pid; with ``clean`` remove its data. True if one ran."""
    broker = running(port)
    if broker:
        _terminate(broker.pid)
    run_dir = _run_dir(port)
    if clean:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        (run_dir / "broker.pid").unlink(missing_ok=True)
    return broker is not None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m localkafka",
        description="Start and stop a single-node Apache Kafka broker (KRaft) on 127.0.0.1, from Maven Central jars.",
    )
    parser.add_argument("command", choices=["up", "down", "status", "fetch"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("LOCALKAFKA_PORT", DEFAULT_PORT)))
    parser.add_argument("--keep-data", action="store_true", help="down: keep the log directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch(quiet=False))
        elif args.command == "up":
            broker = start(args.port, fresh=False)
            print(broker.bootstrap_servers)
        elif args.command == "down":
            was = stop(args.port, clean=not args.keep_data)
            print("stopped" if was else "not running")
        else:
            found = running(args.port)
            print(f"running at {found.bootstrap_servers} (pid {found.pid})" if found else "not running")
            return 0 if found else 1
    except LauncherError as exc:
        print(f"localkafka: {exc}", file=sys.stderr)
        return 2
    return 0
