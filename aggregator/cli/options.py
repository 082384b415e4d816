"""The flags that set settings, and how they become one validated settings object.

A settings flag shows its environment variable (and default) in ``--help`` and wins over it. The
environment itself is read only by the settings classes (pydantic-settings), never by click, so a
bad value reads the same whichever command meets it: one line naming the variable, or the flag.
The arguments of one operation (a limit's ``--tokens``, a tenant, ``--apply``) have no variable:
the environment never changes what a command does to the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

import click
from pydantic import Field, field_validator
from pydantic_core import PydanticUndefined

from aggregator.cli.contract import UsageError
from aggregator.config import AggregatorConfig, AggregatorSettings
from transport.connection import SettingsError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
SERVICE_LOG = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OPERATOR_LOG = "tokenguard: %(levelname)s %(name)s: %(message)s"


class CliSettings(AggregatorSettings):
    """The aggregator's settings and the command line's own, read and validated together."""

    connect_timeout_s: float = Field(10.0, gt=0, le=600, validation_alias="TOKENGUARD_CONNECT_TIMEOUT_S")
    log_level: LogLevel | None = Field(None, validation_alias="TOKENGUARD_LOG_LEVEL")
    verify_wait_s: float = Field(60.0, ge=0, le=86_400, validation_alias="TOKENGUARD_VERIFY_WAIT_S")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


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
        ]):
            command = option(command)
        return command

    return apply


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
    level = settings.log_level or log_level
    logging.basicConfig(level=level, format=log_format)
    if quiet_kafka and level != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return settings, config
