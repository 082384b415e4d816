"""``python -m aggregator`` (and the ``tokenguard-aggregator`` script): ``tokenguard aggregator``.

``python -m aggregator [flags]`` runs the service and ``python -m aggregator verify [flags]`` is
``tokenguard verify``; both take the same flags and environment variables as ``tokenguard``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aggregator.cli.app import main as tokenguard


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    passed_through = args[:1] in (["verify"], ["--version"])
    return tokenguard(args if passed_through else ["aggregator", *args])


if __name__ == "__main__":
    sys.exit(main())
