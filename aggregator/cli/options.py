"""The flags that set settings, and how they become one validated settings object.

A settings flag shows its environment variable (and default) in ``--help`` and wins over it. The
environment itself is read only by the settings classes (pydantic-settings), never by click, so a
bad value reads the same whichever command meets it: one line naming the variable, or the flag.
The arguments of one operation (a limit's ``--tokens``, a tenant, ``--apply``) have no variable:
the environment never changes what a command does to the data.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, get_args

import click
from pydantic import Field, field_validator
from pydantic_core import PydanticUndefined

from aggregator.cli.contract import REQUIRED_TOPICS, UsageError
from aggregator.config import AggregatorConfig, AggregatorSettings
from transport.connection import SettingsError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
SERVICE_LOG = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OPERATOR_LOG = "tokenguard: %(levelname)s %(name)s: %(message)s"


class CliSettings(AggregatorSettings):
    """The aggregator's settings and the command line's own, read and validated together."""

    connect_timeout_s: float = Field(10.0, gt=0, le=600, validation_alias="TOKENGUARD_CONNECT_TIMEOUT_S")
    # ``tokenguard aggregator`` started before Kafka answers: wait for it (AggregatorService.start
    # retries with backoff) instead of exiting 3 ("unreachable") as every other command does.
    wait_for_kafka: bool = Field(False, validation_alias="TOKENGUARD_WAIT_FOR_KAFKA")
    log_level: LogLevel | None = Field(None, validation_alias="TOKENGUARD_LOG_LEVEL")
    log_format: LogFormat = Field("text", validation_alias="TOKENGUARD_LOG_FORMAT")
    verify_wait_s: float = Field(60.0, ge=0, le=86_400, validation_alias="TOKENGUARD_VERIFY_WAIT_S")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format_lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` (with
    the traceback, if any). ``secrets`` (the settings' passwords) are replaced by ``***`` wherever
    they would appear, though nothing of ours logs them: a log shipper must never receive one."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = tuple(secret for secret in secrets if secret)

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        for secret in self._secrets:
            message = message.replace(secret, "***")
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps({"time": when, "level": record.levelname, "logger": record.name, "message": message},
                          ensure_ascii=False)


# aiokafka's messages that a fresh start produces and that resolve themselves (logger, message
# template) -> text one of the arguments must contain ("" for any): the group coordinator is not
# elected yet right after the broker or the offsets topic starts; a topic just created has no
# leader yet.
EXPECTED_AT_START: dict[tuple[str, str], str] = {
    ("aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s"): "CoordinatorNotAvailable",
    ("aiokafka.cluster", "Topic %s is not available during auto-create initialization"): "",
}


class ExpectedKafkaNoise(logging.Filter):
    """A handler filter: the messages in ``EXPECTED_AT_START`` logged within ``window_s`` of its
    creation are lowered to INFO (and dropped where INFO is not enabled); any other aiokafka record,
    and these same ones later (when they mean a real problem), pass unchanged."""

    def __init__(self, window_s: float = 120.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._until = clock() + window_s

    def filter(self, record: logging.LogRecord) -> bool:
        needle = EXPECTED_AT_START.get((record.name, str(record.msg)))
        if needle is None or record.levelno <= logging.INFO or self._clock() > self._until:
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        if needle and not any(needle in str(arg) for arg in args):
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def configure_logging(level: str, *, text_format: str, json_lines: bool, secrets: Iterable[str] = ()) -> None:
    """The process's logging: one handler on stderr, text (``text_format``) or JSON lines, with
    aiokafka's expected start-up errors lowered (``ExpectedKafkaNoise``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(secrets) if json_lines else logging.Formatter(text_format))
    handler.addFilter(ExpectedKafkaNoise())
    logging.basicConfig(level=level, handlers=[handler])


_GIVEN = "tokenguard.flags"  # ctx.meta (shared by a command and its groups): field -> (flag, value)
F = TypeVar("F", bound=Callable[..., Any])


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        ctx.meta.setdefault(_GIVEN, {})[param.name] = (param.opts[0], value)
    return value


def setting(field: str, *flags: str, help: str, default: object = None, **kwargs: Any) -> Callable[[F], F]:
    """A flag that sets ``CliSettings.<field>``; ``--help`` shows its variable and its default (the
    settings' own, or ``default`` where the command has its own). Not given, it sets nothing."""
    info = CliSettings.model_fields[field]
    if default is None and info.default not in (None, PydanticUndefined):
        default = info.default
    shown = f"env var: {info.validation_alias}" + ("" if default is None else f"; default: {default}")
    return click.option(*flags, field, help=f"{help} [{shown}]", default=None, callback=_remember,
                        expose_value=False, **kwargs)


def deployment_options(log_default: str = "WARNING") -> Callable[[F], F]:
    """Where the deployment is: on the root command and on every command that talks to Kafka (the
    command's own win over the root's)."""

    def apply(command: F) -> F:
        for option in reversed([
            setting("bootstrap_servers", "--bootstrap-servers", metavar="HOST:PORT[,...]", help="Kafka brokers"),
            setting("topic_prefix", "--topic-prefix", "--prefix", metavar="PREFIX", help="topic name prefix"),
            setting("group_id", "--group-id", "--group", metavar="GROUP", help="the aggregators' consumer group"),
            setting("connect_timeout_s", "--connect-timeout", type=float, metavar="SECONDS",
                    help="give up (exit 3) when Kafka does not answer within this"),
            setting("log_level", "--log-level", default=log_default, help="log level",
                    type=click.Choice(get_args(LogLevel), case_sensitive=False)),
            setting("log_format", "--log-format", help="log lines as text, or as one JSON object each",
                    type=click.Choice(get_args(LogFormat), case_sensitive=False)),
        ]):
            command = option(command)
        return command

    return apply


# Commands that create the topics, report on them, or need none: every other command that talks to
# Kafka needs the deployment's topics and fails at once (exit 1) when one is missing.
WITHOUT_TOPICS = frozenset({("topics", "create"), ("topics", "check"), ("acls",), ("aggregator",)})


def command_names(ctx: click.Context) -> tuple[str, ...]:
    """The command's names under the root: ("limits", "list") for ``tokenguard limits list``."""
    names: list[str] = []
    while ctx.parent is not None:
        names.append(ctx.command.name or "")
        ctx = ctx.parent
    return tuple(reversed(names))


def load(
    ctx: click.Context, *, log_level: str = "WARNING", log_format: str = OPERATOR_LOG, quiet_kafka: bool = True
) -> tuple[CliSettings, AggregatorConfig]:
    """The flags given over the environment, validated (``UsageError`` naming each flag or
    variable); then logging at the settings' level. ``quiet_kafka``: aiokafka's retries and
    warnings are noise in an operator command's output, below DEBUG."""
    given: dict[str, tuple[str, Any]] = ctx.meta.get(_GIVEN, {})
    try:
        settings = CliSettings.read(**{field: value for field, (_, value) in given.items()})
        config = settings.config()
    except SettingsError as exc:
        named = [(given[name][0] if name in given else name, why) for name, why in exc.problems]
        raise UsageError(str(SettingsError(named))) from None
    except ValueError as exc:  # AggregatorConfig's own checks
        raise UsageError(f"invalid setting: {exc}") from None
    if command_names(ctx) not in WITHOUT_TOPICS:
        ctx.meta[REQUIRED_TOPICS] = [spec.name for spec in config.topics.specs()]
    level = settings.log_level or log_level
    secrets = [secret.get_secret_value() for secret in (settings.sasl_password, settings.ssl_password) if secret]
    configure_logging(level, text_format=log_format, json_lines=settings.log_format == "json", secrets=secrets)
    if quiet_kafka and level != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return settings, config
