"""bench/plots.py writes each plot as a PNG from the figures a bench produces, and bench/_common.py's
save_results the JSON beside them; matplotlib stays out of the packages (it is the bench extra)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib", reason="matplotlib is the bench extra: pip install -c constraints.txt -e '.[bench]'")
sys.path.insert(0, str(REPO / "bench"))

import _common  # noqa: E402
import plots  # noqa: E402


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1_000 and data.startswith(PNG_MAGIC)


def test_propagation_cdf_from_one_series_and_from_labelled_series(tmp_path: Path) -> None:
    latencies = [40.0 + (index * 7) % 90 for index in range(40)]
    one = plots.plot_propagation(latencies, tmp_path / "one.png")
    both = plots.plot_propagation({"base": [value * 2 for value in latencies], "now": latencies}, tmp_path / "both.png")
    assert _is_png(one) and _is_png(both)


def test_overshoot_timeline_with_notice_arrivals(tmp_path: Path) -> None:
    admitted = [(index * 0.01, index * 5_000.0) for index in range(60)]
    notices = {f"ours{index}": 0.42 + index * 0.005 for index in range(16)}
    path = plots.plot_overshoot(admitted, 200_000, notices, tmp_path / "results" / "overshoot.png")
    assert _is_png(path)


def test_throughput_draws_the_figures_present_and_ignores_the_rest(tmp_path: Path) -> None:
    figures = {"getmany_eps": 298_000, "aggregate_eps_1": 61_000.5, "publish_eps": 120_000, "ratio_to_ceiling": 0.2,
               "tpm_one_window": True}
    assert _is_png(plots.plot_throughput(figures, tmp_path / "throughput.png"))


def test_restore_time_and_memory_against_keys(tmp_path: Path) -> None:
    rows = [{"keys": 1_000_000, "restore_s": 12.6, "peak_rss_mb": 1_700.0},
            {"keys": 100_000, "restore_s": 1.2, "peak_rss_mb": 180.0},
            {"keys": 300_000, "restore_s": 3.7, "peak_rss_mb": 520.0}]
    assert _is_png(plots.plot_restore(rows, tmp_path / "restore.png"))


def test_save_results_writes_the_figures_with_name_and_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    path = _common.save_results("sample", {"p99_ms": 87.5, "trials": 40})
    assert path == tmp_path / "sample.json"
    saved = json.loads(path.read_text())
    assert saved["bench"] == "sample" and saved["p99_ms"] == 87.5 and saved["trials"] == 40
    assert saved["commit"] and saved["measured_at"].endswith("Z")


@pytest.mark.parametrize("package", ["producer", "aggregator", "schemas", "transport"])
def test_no_package_imports_matplotlib_or_the_plots(package: str) -> None:
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(name.split(".")[0] in {"matplotlib", "plots", "bench"} for name in names):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders
