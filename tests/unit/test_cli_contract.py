"""The operator commands' contract, without a broker: exit codes (0 done, 1 problem, 2 usage
error, 3 Kafka unreachable), one line on stderr and no traceback, bounded time to answer, output
that writes no control character to a terminal, and the ACL set's shape."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import version

import click
import pytest
from aiokafka.errors import GroupAuthorizationFailedError, KafkaConnectionError, TopicAuthorizationFailedError
from click.testing import CliRunner
from pydantic import ValidationError

from aggregator.acls import Acl, AclError, Principals, deployment_acls, kafka_acls_commands
from aggregator.cli import (
    EXIT_PROBLEM,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliSettings,
    KafkaUnreachableError,
    UsageError,
    exit_code,
    printable,
    show_limit,
    tokenguard,
    totals_json,
    totals_row,
    validation_message,
)
from aggregator.errors import AggregatorError
from schemas.limits import QuotaLimit
from schemas.topics import TopicLayout
from schemas.totals import TotalsRecord
from tests.helpers import REPO
from transport.admin import TopicMismatchError
from transport.connection import KafkaConnection

ESC = "\x1b"


# -- printable ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("acme", "acme"),
        ("Zürich 東京 ✓ a b", "Zürich 東京 ✓ a b"),  # printable text is left alone, spaces too
        ("2026-11\x1b[2J", "2026-11\\x1b[2J"),  # clear screen
        ("a\nFAKE LINE", "a\\nFAKE LINE"),
        ("tab\there\r", "tab\\there\\r"),
        ("nul\x00", "nul\\x00"),
        ("csi\x9b31m", "csi\\x9b31m"),  # the 8-bit CSI of C1 controls
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # bidi override
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("bell\x07", "bell\\x07"),
    ],
)
def test_printable_escapes_every_non_printable_character(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(raw).isprintable()


def test_printable_takes_any_object() -> None:
    assert printable(12) == "12"
    assert printable(ValueError("bad\x1b")) == "bad\\x1b"


def _hostile_totals() -> TotalsRecord:
    # model_construct: a record as a topic could hold it, whatever the schema of the day accepts.
    return TotalsRecord.model_construct(
        tenant_id=f"ten{ESC}]0;pwned\x07ant", period_key=f"2026-11{ESC}[2J", used_tokens=5, event_count=1,
        limit_tokens=10, state="ok", usage_partition=0, applied_offset=3, updated_at=datetime.now(UTC),
    )


def test_usage_rows_and_limits_write_no_control_character() -> None:
    record = _hostile_totals()
    row = totals_row(record)
    assert ESC not in row and "\x07" not in row and row.isprintable()
    assert "2026-11\\x1b[2J" in row and "ten\\x1b]0;pwned\\x07ant" in row
    line = totals_json(record)
    assert line.isascii() and ESC not in line and "\\u001b[2J" in line
    limit = QuotaLimit.model_construct(tenant_id=f"acme{ESC}[31m", limit_tokens=5, period="any", warning_ratio=None,
                                       updated_at=datetime.now(UTC))
    assert ESC not in show_limit(limit) and "acme\\x1b[31m" in show_limit(limit)


def test_validation_errors_read_as_one_line_naming_the_flag() -> None:
    with pytest.raises(ValidationError) as caught:
        QuotaLimit(tenant_id="acme", limit_tokens=-1, warning_ratio=2.0, updated_at=datetime.now(UTC))
    message = validation_message(caught.value, {"limit_tokens": "--tokens", "warning_ratio": "--warning-ratio"})
    assert "\n" not in message
    assert message.startswith("--tokens: Input should be greater than or equal to 0; --warning-ratio:")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UsageError("x"), EXIT_USAGE),
        (KafkaUnreachableError("x"), EXIT_UNREACHABLE),
        (KafkaConnectionError("x"), EXIT_UNREACHABLE),
        (ConnectionRefusedError("x"), EXIT_UNREACHABLE),
        (TimeoutError(), EXIT_UNREACHABLE),
        (TopicAuthorizationFailedError("t"), EXIT_UNREACHABLE),
        (GroupAuthorizationFailedError("g"), EXIT_UNREACHABLE),
        (TopicMismatchError("x"), EXIT_PROBLEM),
        (AggregatorError("x"), EXIT_PROBLEM),
    ],
)
def test_each_error_has_its_exit_code(error: Exception, code: int) -> None:
    outcome = exit_code(error, KafkaConnection(bootstrap_servers="b:9092"))
    assert outcome is not None and outcome[0] == code and "\n" not in outcome[1]


def test_a_bug_is_not_disguised_as_an_exit_code() -> None:
    assert exit_code(KeyError("bug"), KafkaConnection()) is None


# -- the ACL set -------------------------------------------------------------------------------


def _acls(prefix: str = "tg.", group: str = "tg-aggregators") -> list[Acl]:
    return deployment_acls(TopicLayout(prefix=prefix), Principals("User:agent", "User:agg", "User:op"), group)


def test_agents_write_usage_only_and_nobody_else_writes_control_topics() -> None:
    layout, acls = TopicLayout(prefix="tg."), _acls()
    writes = {(a.principal, a.resource_name) for a in acls if a.operation in ("WRITE", "CREATE")}
    assert {name for who, name in writes if who == "User:agent"} == {layout.usage}
    assert {who for who, name in writes if name in (layout.notices, layout.dead_letters)} == {"User:agg"}
    assert {who for who, name in writes if name == layout.limits} == {"User:op"}
    assert {who for who, name in writes if name == layout.totals} == {"User:agg", "User:op"}  # op: replay
    # READ and WRITE are on exact names: a PREFIXED 'tg.usage' would match 'tg.usage.dlq'.
    assert all(a.pattern == "LITERAL" for a in acls if a.operation in ("READ", "WRITE"))
    assert all(a.resource_name == "tg." for a in acls if a.pattern == "PREFIXED")
    assert {a.principal for a in acls if a.resource_type == "GROUP"} == {"User:agg", "User:op"}
    assert not any(a.principal == "User:agent" and a.operation == "READ" and a.resource_name == layout.usage for a in acls)


def test_kafka_acls_command_lines_cover_every_acl_once() -> None:
    acls = _acls("weird prefix;rm -rf.")
    lines = kafka_acls_commands(acls, "b:9092")
    covered = set()
    for line in lines:
        words = shlex.split(line)
        assert words[:5] == ["kafka-acls.sh", "--bootstrap-server", "b:9092", "--add", "--allow-principal"]
        operations = [words[i + 1] for i, word in enumerate(words) if word == "--operation"]
        kind = next(word for word in words if word in ("--topic", "--group"))
        name = words[words.index(kind) + 1]
        pattern = words[words.index("--resource-pattern-type") + 1]
        for operation in operations:
            covered.add((words[5], kind[2:].upper(), name, pattern.upper(), operation))
    assert covered == {
        (a.principal, a.resource_type, a.resource_name, a.pattern, "".join(p.capitalize() for p in a.operation.split("_")))
        for a in acls
    }
    assert len(covered) == len(acls)


@pytest.mark.parametrize("principal", ["agent", "User:", ":x", "User:a b", "User:a\x1b"])
def test_a_malformed_principal_is_refused(principal: str) -> None:
    with pytest.raises(AclError):
        Principals(principal, "User:g", "User:o")


# -- as processes: usage errors and an unreachable Kafka -----------------------------------------
#
# Every case below is one ``tokenguard`` process; they run concurrently once per module (the
# ``outcomes`` fixture), and each test reads its cases' results.

Case = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]
Outcome = tuple[int, str, str, float]

USAGE_ERRORS = [
    ("limits", "set", "acme", "--tokens", "-5"),
    ("limits", "set", "acme", "--tokens", str(10**16)),
    ("limits", "set", "acme", "--tokens", "10", "--warning-ratio", "1.5"),
    ("limits", "set", "acme", "--tokens", "10", "--warning-ratio", "nan"),
    ("limits", "set", "acme", "--tokens", "many"),
    ("limits", "set", "--tokens", "10"),
    ("limits", "set", "acme", "--default", "--tokens", "10"),
    ("limits", "set", "acme", "--tokens", "10", "--period", "year"),
    ("limits", "set", "x" * 300, "--tokens", "10"),
    ("limits", "get", f"bad{ESC}[2J"),
    ("limits", "delete", ""),
    ("usage", "show", "--period", f"2026{ESC}[2J"),
    ("usage", "show", "--tenant", ""),
    ("topics", "create", "--partitions", "0"),
    ("topics", "frobnicate"),
    ("replay", "--since", "yesterday"),
    ("verify", "--wait-s", "-1"),
    ("verify", "--no-such-flag"),
    ("aggregator", "--warning-ratio", "3"),
    ("aggregator", "--metrics-port", "70000"),
    ("aggregator", "--connect-timeout", "0"),
    ("acls", "--agent", "agent", "--aggregator", "User:g", "--operator", "User:o"),
    ("acls", "--agent", "User:a"),
    ("usage", "show", "--connect-timeout", "-3"),
    ("nosuchcommand",),
]
BAD_ENVIRONMENTS = [
    {"TOKENGUARD_PARTITIONS": "abc"},
    {"TOKENGUARD_CONNECT_TIMEOUT_S": "soon"},
    {"KAFKA_SECURITY_PROTOCOL": "carrier-pigeon"},
    {"TOKENGUARD_WARNING_RATIO": "2"},
]
ENV_COMMANDS = [("usage", "show"), ("verify",), ("aggregator",)]
COMMANDS = [
    ("usage", "show"),
    ("limits", "list"),
    ("limits", "get", "acme"),
    ("limits", "set", "acme", "--tokens", "5"),
    ("limits", "delete", "acme"),
    ("topics", "check"),
    ("topics", "create"),
    ("verify",),
    ("replay",),
    ("aggregator",),
    ("acls", "--agent", "User:a", "--aggregator", "User:g", "--operator", "User:o", "--apply"),
]
SILENT_COMMANDS = [("usage", "show"), ("verify",), ("aggregator",)]
ACLS_PRINT = ("acls", "--prefix", "tg.", "--agent", "User:agent", "--aggregator", "User:agg", "--operator", "User:op",
              "--group", "tg-aggregators")
SILENT = "{silent}"  # replaced by the silent server's address
ALIAS = "{python -m aggregator}"  # a case that starts with it runs the alias instead of tokenguard
ALIAS_CASES = [
    ((ALIAS, "--warning-ratio", "3"), EXIT_USAGE),
    ((ALIAS, "verify", "--wait-s", "-1"), EXIT_USAGE),
    ((ALIAS, "--no-such-flag"), EXIT_USAGE),
    ((ALIAS, "--bootstrap-servers", "127.0.0.1:1", "--topic-prefix", "tg.", "--partitions", "3", "--group-id", "g",
      "--log-level", "INFO", "--instance-id", "i-1"), EXIT_UNREACHABLE),
    ((ALIAS, "verify", "--bootstrap-servers", "127.0.0.1:1", "--topic-prefix", "tg.", "--group-id", "g",
      "--wait-s", "30"), EXIT_UNREACHABLE),
]
VERSIONS = [("--version",), (ALIAS, "--version")]
ACLS = ("acls", "--agent", "User:a", "--aggregator", "User:g", "--operator", "User:o")
PRECEDENCE = [  # (args, environment, the topic prefix the ACLs are printed for)
    (ACLS, (("TOKENGUARD_TOPIC_PREFIX", "env."),), "env."),
    (("--prefix", "root.", *ACLS), (("TOKENGUARD_TOPIC_PREFIX", "env."),), "root."),
    (("--prefix", "root.", *ACLS, "--topic-prefix", "cmd."), (("TOKENGUARD_TOPIC_PREFIX", "env."),), "cmd."),
    ((*ACLS, "--prefix", "flag."), (("TOKENGUARD_TOPIC_PREFIX", "not a valid prefix!"),), "flag."),
]


def _cases() -> list[Case]:
    cases: list[Case] = [(args, ()) for args in USAGE_ERRORS]
    cases += [(args, tuple(env.items())) for env in BAD_ENVIRONMENTS for args in ENV_COMMANDS]
    cases += [((*args, "--bootstrap-servers", "127.0.0.1:1"), ()) for args in COMMANDS]
    cases += [((*args, "--bootstrap-servers", SILENT, "--connect-timeout", "2"), ()) for args in SILENT_COMMANDS]
    cases += [(("limits", "list", "--bootstrap-servers", SILENT), (("TOKENGUARD_CONNECT_TIMEOUT_S", ""),))]
    cases += [(ACLS_PRINT, ())]
    cases += [(args, ()) for args, _ in ALIAS_CASES] + [(args, ()) for args in VERSIONS]
    cases += [(args, env) for args, env, _ in PRECEDENCE]
    return cases


def _run(args: tuple[str, ...], env: tuple[tuple[str, str], ...], silent: str) -> Outcome:
    started = time.monotonic()
    module, args = ("aggregator", args[1:]) if args[:1] == (ALIAS,) else ("aggregator.cli", args)
    process = subprocess.run(
        [sys.executable, "-m", module, *(silent if arg == SILENT else arg for arg in args)],
        cwd=REPO, capture_output=True, timeout=60, check=False,
        # Anything that slipped past validation would meet a closed port (exit 3), never a broker.
        env={**os.environ, "PYTHONPATH": str(REPO), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", **dict(env)},
    )
    return process.returncode, process.stdout.decode(), process.stderr.decode(), time.monotonic() - started


@contextmanager
def silent_server() -> Iterator[str]:
    """A TCP port on 127.0.0.1 that accepts connections and never answers: the slow failure."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture(scope="module")
def outcomes() -> dict[Case, Outcome]:
    cases = _cases()
    with silent_server() as silent, ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda case: _run(*case, silent), cases))
    return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda args: " ".join(args)[:40])
def test_every_usage_error_exits_2_with_one_line(outcomes: dict[Case, Outcome], args: tuple[str, ...]) -> None:
    code, out, err, _ = outcomes[(args, ())]
    assert code == EXIT_USAGE, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("tokenguard") and "Traceback" not in err, err
    assert ESC not in err and out == ""


@pytest.mark.parametrize("env", BAD_ENVIRONMENTS, ids=lambda env: next(iter(env)))
def test_a_bad_environment_variable_is_a_usage_error_too(outcomes: dict[Case, Outcome], env: dict[str, str]) -> None:
    for args in ENV_COMMANDS:
        code, _, err, _ = outcomes[(args, tuple(env.items()))]
        assert code == EXIT_USAGE and err.count("\n") == 1 and "Traceback" not in err, (args, err)


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args)[:30])
def test_a_closed_port_exits_3_at_once_with_one_line(outcomes: dict[Case, Outcome], args: tuple[str, ...]) -> None:
    code, out, err, took = outcomes[((*args, "--bootstrap-servers", "127.0.0.1:1"), ())]
    assert code == EXIT_UNREACHABLE, (code, out, err)
    assert err.count("\n") == 1 and "127.0.0.1:1" in err and "Traceback" not in err, err
    assert took < 10, f"{took:.1f}s"


@pytest.mark.parametrize("args", SILENT_COMMANDS, ids=lambda args: args[0])
def test_a_silent_kafka_exits_3_within_the_connect_timeout(outcomes: dict[Case, Outcome], args: tuple[str, ...]) -> None:
    code, _, err, took = outcomes[((*args, "--bootstrap-servers", SILENT, "--connect-timeout", "2"), ())]
    assert code == EXIT_UNREACHABLE and err.count("\n") == 1 and "within 2s" in err, err
    assert 2 <= took < 10, f"{took:.1f}s"


def test_the_default_connect_timeout_is_bounded(outcomes: dict[Case, Outcome]) -> None:
    code, _, err, took = outcomes[(("limits", "list", "--bootstrap-servers", SILENT), (("TOKENGUARD_CONNECT_TIMEOUT_S", ""),))]
    assert code == EXIT_UNREACHABLE and "within 10s" in err and 10 <= took < 20, (err, took)


def test_acls_prints_without_a_broker(outcomes: dict[Case, Outcome]) -> None:
    code, out, err, _ = outcomes[(ACLS_PRINT, ())]
    assert code == 0 and err == "", err
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert lines == kafka_acls_commands(_acls("tg.", "tg-aggregators"), "127.0.0.1:1")


# -- one command tree: the alias, --version, which flag wins, every setting's variable in --help --


@pytest.mark.parametrize(("args", "code"), ALIAS_CASES, ids=lambda case: " ".join(case)[:40] if isinstance(case, tuple) else "")
def test_python_m_aggregator_is_tokenguard_aggregator(outcomes: dict[Case, Outcome], args: tuple[str, ...], code: int) -> None:
    got, out, err, _ = outcomes[(args, ())]
    assert got == code, (got, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err and out == "", err
    assert err.startswith("tokenguard verify: " if "verify" in args else "tokenguard aggregator: "), err


@pytest.mark.parametrize("args", VERSIONS, ids=["tokenguard", "alias"])
def test_version_is_the_installed_distributions(outcomes: dict[Case, Outcome], args: tuple[str, ...]) -> None:
    code, out, err, _ = outcomes[(args, ())]
    assert (code, out, err) == (0, f"tokenguard {version('tokenguard-stream')}\n", "")


@pytest.mark.parametrize(("args", "env", "prefix"), PRECEDENCE, ids=["env", "root flag", "command flag", "flag over bad env"])
def test_the_commands_flag_wins_over_the_roots_over_the_environment(
    outcomes: dict[Case, Outcome], args: tuple[str, ...], env: tuple[tuple[str, str], ...], prefix: str
) -> None:
    code, out, err, _ = outcomes[(args, env)]
    assert code == 0 and err == "", err
    assert out.startswith(f"# Kafka ACLs for topic prefix {prefix!r} and"), out


# Arguments of one operation: no environment variable may change what a command does to the data.
OPERATION_ARGUMENTS = {"help", "version", "tenant", "default", "tokens", "period", "warning_ratio", "as_json", "since",
                       "agent", "aggregator", "operator", "apply", "model", "input_", "output", "currency", "cached_input",
                       "reasoning", "effective_from", "rules_file",
                       "rule", "limit_", "window", "rate", "timezone", "measure", "input_weight", "output_weight",
                       "unknown_model", "user", "attributes", "thresholds", "action"}
# Settings only the environment sets: secrets never go on a command line (ps shows it).
ENVIRONMENT_ONLY = {"security_protocol", "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile",
                    "ssl_certfile", "ssl_keyfile", "ssl_password"}


def _commands(group: click.Group = tokenguard, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_settings_flag_shows_its_variable_and_every_setting_has_a_flag() -> None:
    variables = CliSettings.variables()
    flagged = set()
    for path, command in _commands():
        help_text = CliRunner().invoke(tokenguard, [*path, "--help"], terminal_width=400)
        assert help_text.exit_code == 0, help_text.output
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            limits_own = path == ("limits", "set") and param.name == "warning_ratio"  # the limit's, not a setting
            if param.name in variables and not limits_own:
                assert f"[env var: {variables[param.name]}" in (param.help or ""), (path, param.name)
                assert variables[param.name] in help_text.output, (path, param.name)
                flagged.add(param.name)
            else:
                assert param.name in OPERATION_ARGUMENTS and "env var" not in (param.help or ""), (path, param.name)
    assert set(variables) - flagged == ENVIRONMENT_ONLY


def test_a_missing_command_is_a_usage_error_not_a_page_of_help() -> None:
    process = subprocess.run([sys.executable, "-m", "aggregator.cli", "limits"], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.returncode == EXIT_USAGE and process.stderr.count("\n") == 1 and process.stdout == ""
    assert process.stderr.startswith("tokenguard limits: Missing command"), process.stderr


def test_the_cli_settings_keep_every_components_rules() -> None:
    settings = CliSettings.read({"KAFKA_SECURITY_PROTOCOL": "ssl", "TOKENGUARD_LOG_LEVEL": "debug"}, partitions=3)
    assert (settings.security_protocol, settings.log_level, settings.config().topics.partitions) == ("SSL", "DEBUG", 3)
    assert (settings.connect_timeout_s, settings.verify_wait_s) == (10.0, 60.0)
