"""The exit-code contract every command keeps, and the probe that makes "unreachable" fast.

0 done; 1 a check found a problem (or the service failed while running); 2 usage error: any invalid
flag, value or environment variable, one line on stderr, before any Kafka I/O; 3 Kafka unreachable
(no answer within the connect timeout) or refusing (authentication, authorization). An error is
one line on stderr, never a traceback; an unexpected exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import click
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError

from aggregator.cli.output import printable
from aggregator.errors import AggregatorError
from schemas.errors import SchemaError
from transport.admin import aiokafka_quieted
from transport.connection import KafkaConnection, SettingsError
from transport.errors import TransportError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class UsageError(AggregatorError):
    """The command line or the environment asks for something invalid: exit 2, before any Kafka I/O."""


class KafkaUnreachableError(AggregatorError):
    """No Kafka answer within the connect timeout (or the cluster refused the connection): exit 3."""


class MissingTopicError(AggregatorError):
    """The deployment's topics are not there (never created, or another prefix): exit 1 at once,
    instead of the Kafka client's metadata retries."""


# ctx.meta key: the topics the running command needs (``options.load`` sets it; ``run`` checks).
REQUIRED_TOPICS = "tokenguard.required_topics"


class Command(click.Command):
    """A click command whose ``UsageError`` (and invalid settings) are click's usage errors, so
    they are reported like a wrong flag: one line naming the command, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UsageError, SettingsError) as exc:
            raise click.UsageError(str(exc), ctx) from None


class Group(click.Group):
    """A group of ``Command``s (and of such groups); a missing subcommand is a usage error, not help;
    ``--help`` lists the subcommands in the order they were added."""

    command_class = Command
    group_class = type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", False)
        super().__init__(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they were added, not alphabetical


async def probe(connection: KafkaConnection, timeout_s: float, *, required_topics: Sequence[str] = ()) -> None:
    """Return once the cluster answers a metadata request; ``KafkaUnreachableError`` if it does not
    within ``timeout_s``. Every command that talks to Kafka starts with it, so an unreachable
    cluster is one line and exit 3 within the timeout, whatever the command would do next.
    ``MissingTopicError`` names the first of ``required_topics`` the cluster does not have (one
    metadata request for every topic the client may describe)."""
    where = connection.bootstrap_servers
    with aiokafka_quieted() as capture:
        client = AIOKafkaClient(**connection.client_kwargs(), client_id="tokenguard-probe",
                                request_timeout_ms=max(1000, int(timeout_s * 1000)))
        try:
            async with asyncio.timeout(timeout_s):
                await client.bootstrap()
                # Every topic's metadata (a request naming the topics could auto-create them).
                existing = (await client.fetch_all_metadata()).topics() if required_topics else set()
        except TimeoutError:
            raise KafkaUnreachableError(f"Kafka at {where} did not answer within {timeout_s:g}s") from None
        except KafkaError as exc:
            raise KafkaUnreachableError(f"cannot reach Kafka at {where}: {capture.last or exc}") from None
        finally:
            await client.close()
    missing = [topic for topic in required_topics if topic not in existing]
    if missing:
        raise MissingTopicError(f"topic {missing[0]} does not exist: run `tokenguard topics create`")


def exit_code(exc: BaseException, connection: KafkaConnection) -> tuple[int, str] | None:
    """The exit code and one-line message for an error that ends a command; None for a bug."""
    where = connection.bootstrap_servers
    if isinstance(exc, UsageError | SettingsError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, KafkaUnreachableError):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, KafkaConnectionError | OSError):  # TimeoutError is an OSError
        return EXIT_UNREACHABLE, f"cannot reach Kafka at {where}: {exc or type(exc).__name__}"
    if isinstance(exc, KafkaError):
        return EXIT_UNREACHABLE, f"Kafka at {where} refused: {type(exc).__name__}: {exc}"
    if isinstance(exc, AggregatorError | TransportError | SchemaError):
        return EXIT_PROBLEM, str(exc)
    return None


def run(
    prog: str, connection: KafkaConnection, timeout_s: float | None, command: Callable[[], Awaitable[int]]
) -> int:
    """Run ``command`` (after a probe when ``timeout_s`` is given, which also checks that the
    topics the command needs exist: ``REQUIRED_TOPICS``) under the exit-code contract."""
    ctx = click.get_current_context(silent=True)
    required: Sequence[str] = ctx.meta.get(REQUIRED_TOPICS, ()) if ctx is not None else ()

    async def guarded() -> int:
        if timeout_s is not None:
            await probe(connection, timeout_s, required_topics=required)
        return await command()

    try:
        return asyncio.run(guarded())
    except Exception as exc:
        outcome = exit_code(exc, connection)
        if outcome is None:
            raise
        code, message = outcome
        print(f"{prog}: {printable(message)}", file=sys.stderr)
        return code
