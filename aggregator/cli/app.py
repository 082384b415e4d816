"""The ``tokenguard`` command: its root, ``--version``, and usage errors as one line (exit 2)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import click

from aggregator.cli.contract import EXIT_USAGE, Group
from aggregator.cli.deploy import acls, topics
from aggregator.cli.limits import limits
from aggregator.cli.options import deployment_options, setting
from aggregator.cli.output import printable
from aggregator.cli.prices import prices
from aggregator.cli.serve import aggregator, verify
from aggregator.cli.simulate import simulate
from aggregator.cli.totals import replay, usage

DISTRIBUTION = "tokenguard-stream"


def _version(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    try:
        click.echo(f"tokenguard {version(DISTRIBUTION)}")
    except PackageNotFoundError:
        click.echo(f"tokenguard (unknown version: the {DISTRIBUTION} distribution is not installed)")
    ctx.exit()


@click.group(
    cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="Exit codes: 0 done; 1 a check found a problem (or the aggregator failed); 2 usage error (one line, "
    "nothing sent to Kafka); 3 Kafka unreachable within --connect-timeout, or refusing. The deployment's flags "
    "go before or after the command; each shows its environment variable, and a flag wins over it.",
)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="print the installed version and exit")
@deployment_options()
def tokenguard() -> None:
    """Operate a TokenGuard Stream deployment: run its aggregator, set limits, read totals, verify
    them, rebuild them, create its topics and print its ACLs.

    \b
      tokenguard aggregator [--metrics-port 9464]       run the service
      tokenguard topics create | check
      tokenguard limits set acme --tokens 2000000      (--default for everyone else)
      tokenguard limits get acme | list | delete acme
      tokenguard usage show [--tenant acme] [--period 2026-11] [--json]
      tokenguard verify                                 independent recompute; exit 1 on a difference
      tokenguard replay [--since 2026-11-01]            rebuild totals (aggregators stopped)
      tokenguard acls --agent User:a --aggregator User:g --operator User:o [--apply]
    """


# The service's telemetry flags (its other settings' flags are in aggregator/cli/serve.py).
setting("metrics_top_tenants", "--metrics-top-tenants", type=click.IntRange(0, 10_000), metavar="N",
        help="per-tenant gauges on /metrics for the top N tenant-periods by tokens used, plus every one not ok")(aggregator)

for command in (aggregator, verify, limits, prices, usage, replay, simulate, topics, acls):
    tokenguard.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tokenguard`` with ``argv`` (default: the process's) and return its exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = tokenguard.main(args=args, prog_name="tokenguard", standalone_mode=False)
    except click.UsageError as exc:  # wrong flags and values, invalid settings (Command turns ours into these)
        where = exc.ctx.command_path if exc.ctx else "tokenguard"
        print(f"{where}: {printable(exc.format_message())} (see '{where} --help')", file=sys.stderr)
        return EXIT_USAGE
    except click.ClickException as exc:
        print(f"tokenguard: {printable(exc.format_message())}", file=sys.stderr)
        return exc.exit_code
    except click.Abort:
        print("tokenguard: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0
