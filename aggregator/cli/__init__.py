"""``tokenguard``: the one command line of a deployment (``python -m aggregator`` is its
``aggregator`` command). click parses; the settings classes read the environment.

    app.py       the root command, --version, usage errors as one line
    serve.py     aggregator (the service), verify (its independent check)
    limits.py    limits set | get | list | delete
    totals.py    usage show, replay
    deploy.py    topics create | check, acls
    options.py   the settings flags (each with its environment variable) -> CliSettings
    contract.py  exit codes 0/1/2/3, the Kafka probe, errors as one line
    output.py    what reaches the terminal: control characters escaped

Why click: the tree is nested groups (``limits set``), and click has them, per-command help,
``--version`` and flags before or after the command without hand-written plumbing, and no
dependencies of its own. argparse needed a second parser and argv sniffing for the same tree;
typer is click underneath plus rich and type-hint magic, whose boxed error panels would have to be
turned off to keep errors on one line. The environment is not click's: ``CliSettings``
(pydantic-settings) reads it, so an environment variable has one reader and one kind of message.
"""

from aggregator.cli.app import main, tokenguard
from aggregator.cli.contract import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    KafkaUnreachableError,
    UsageError,
    exit_code,
    run,
)
from aggregator.cli.options import CliSettings
from aggregator.cli.output import printable, show_limit, totals_json, totals_row, validation_message

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliSettings",
    "KafkaUnreachableError",
    "UsageError",
    "exit_code",
    "main",
    "printable",
    "run",
    "show_limit",
    "tokenguard",
    "totals_json",
    "totals_row",
    "validation_message",
]
