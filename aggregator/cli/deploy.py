"""``tokenguard topics create|check`` and ``tokenguard acls``: what a deployment needs on the cluster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from aggregator.acls import AclError, Principals, apply_acls, deployment_acls, kafka_acls_commands
from aggregator.cli.contract import EXIT_OK, EXIT_PROBLEM, Command, Group, UsageError, run
from aggregator.cli.options import deployment_options, load, setting
from aggregator.cli.output import printable
from transport.admin import TopicMismatchError, ensure_topics, retention_findings, topic_partitions

F = TypeVar("F", bound=Callable[..., Any])


def retention_options(command: F) -> F:
    """The settings the usage topic's retention follows: on ``aggregator`` and ``topics create|check``."""
    command = setting("seal_grace_s", "--seal-grace", type=float, metavar="SECONDS",
                      help="how long after a period's end its late events still count in it")(command)
    return setting("longest_period_s", "--longest-period", type=float, metavar="SECONDS",
                   help="the longest period or window counted in (a year rule: 31622400); with the grace "
                        "it sets the usage topic's retention")(command)


@click.group(cls=Group)
def topics() -> None:
    """Create the deployment's topics, or check them."""


@topics.command()
@setting("partitions", "--partitions", type=int, help="partitions of usage, totals and notices")
@retention_options
@deployment_options()
@click.pass_context
def create(ctx: click.Context) -> int:
    """Create the six topics (or check those that exist have usable settings)."""
    settings, config = load(ctx)

    async def created() -> int:
        partitions = await ensure_topics(config.connection, config.topics)
        for name, count in sorted(partitions.items()):
            print(f"{printable(name)}: {count} partitions")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, created)


@topics.command()
@retention_options
@deployment_options()
@click.pass_context
def check(ctx: click.Context) -> int:
    """Print each topic's partitions; exit 1 if any is missing or mismatched, or if the usage topic
    keeps events for less than its periods need (RETENTION); a retention.bytes limit is a WARNING."""
    settings, config = load(ctx)

    async def checked() -> int:
        problems = 0
        for spec in config.topics.specs():
            try:
                count = len(await topic_partitions(config.connection, spec.name))
                print(f"{printable(spec.name)}: {count} partitions")
            except TopicMismatchError as exc:
                print(f"MISSING {printable(exc)}")
                problems += 1
                continue
            if spec.name == config.topics.usage:
                problem, warning = await retention_findings(config.connection, spec.name,
                                                            longest_period_s=config.longest_period_s,
                                                            seal_grace_s=config.seal_grace_s)
                if warning:
                    print(f"WARNING {printable(warning)}")
                if problem:
                    print(f"RETENTION {printable(problem)}")
                    problems += 1
        return EXIT_PROBLEM if problems else EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, checked)


@click.command(cls=Command, short_help="the deployment's Kafka ACLs as kafka-acls.sh commands; --apply creates them")
@click.option("--agent", required=True, metavar="PRINCIPAL", help="the agents' principal, e.g. User:agent")
@click.option("--aggregator", required=True, metavar="PRINCIPAL", help="the aggregators' principal")
@click.option("--operator", required=True, metavar="PRINCIPAL", help="the operators' principal")
@click.option("--apply", is_flag=True, help="create the ACLs now, and wait until they are in force")
@deployment_options()
@click.pass_context
def acls(ctx: click.Context, agent: str, aggregator: str, operator: str, apply: bool) -> int:
    """Print the ACLs each kind of client needs (agents, aggregators, operators) for one topic
    prefix and aggregator group, as kafka-acls.sh command lines. With --apply, create them through
    the admin API, connected as a principal allowed to alter ACLs."""
    settings, config = load(ctx)
    try:
        wanted = deployment_acls(config.topics, Principals(agent=agent, aggregator=aggregator, operator=operator),
                                 config.group_id)
    except AclError as exc:
        raise UsageError(str(exc)) from None

    async def printed() -> int:
        print(f"# Kafka ACLs for topic prefix {config.topics.prefix!r} and aggregator group {config.group_id!r}")
        print("# run as a principal allowed to alter ACLs; add --command-config FILE for its credentials")
        for line in kafka_acls_commands(wanted, config.connection.bootstrap_servers):
            print(printable(line))
        if apply:
            await apply_acls(config.connection, wanted)
            print(f"# applied: {len(wanted)} ACLs in force")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s if apply else None, printed)
