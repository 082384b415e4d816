"""The layers: ``producer`` (the agent side) and ``aggregator`` both build on ``transport`` and
``schemas`` and never on each other, so the aggregator's process, the CLI and a billing consumer
never load the agent framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package -> packages of ours it may import
ALLOWED = {
    "schemas": {"schemas"},
    "transport": {"transport", "schemas"},
    "producer": {"producer", "transport", "schemas"},
    "aggregator": {"aggregator", "transport", "schemas"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        f"{path.relative_to(REPO)} imports {sorted(_imports(path) - ALLOWED[package])}"
        for path in sorted((REPO / package).rglob("*.py"))
        if _imports(path) - ALLOWED[package]
    }
    assert not wrong


@pytest.mark.parametrize(
    "code",
    [
        "import aggregator, aggregator.service, aggregator.verify, aggregator.replay",
        "import aggregator.cli, aggregator.__main__",
        "import importlib.util as u; s = u.spec_from_file_location('billing', 'examples/billing.py');"
        " m = u.module_from_spec(s); s.loader.exec_module(m)",
    ],
    ids=["aggregator", "cli", "billing-example"],
)
def test_the_agent_framework_is_not_loaded(code: str) -> None:
    check = f"{code}\nimport sys\nloaded = sorted(m for m in sys.modules if m.split('.')[0] in ('agent_framework', 'producer'))\nprint(loaded)"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
