"""The benchmarks' plots, one PNG each, written beside the bench's JSON in bench/results/.

matplotlib is the ``bench`` extra: only the scripts under bench/ import this module, never the
packages, so an installed aggregator or middleware does not carry a plotting stack. The Agg backend
draws to files without a display (CI, a server, a container).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

PROPAGATION_TARGET_MS = 100.0
THROUGHPUT_TARGET_EPS = 150_000
RESTORE_TARGET_S = 5.0
RESTORE_TARGET_MB = 400.0

THROUGHPUT_BARS = (
    ("getmany_eps", "bare consumer\n(getmany)"),
    ("consumer_ceiling_eps", "consumer ceiling\n(decode only)"),
    ("librdkafka_eps", "confluent-kafka\n(consume)"),
    ("librdkafka_decode_eps", "confluent-kafka\n(+ decode)"),
    ("before_aggregate_eps_1", "aggregator, 1 process\n(before, --before)"),
    ("aggregate_eps_1", "aggregator\n1 process"),
    ("aggregate_eps_2", "aggregator\n2 processes"),
    ("publish_eps", "publisher"),
)


def _save(figure: Figure, path: Path | str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def _thousands(axis: object) -> None:
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))  # type: ignore[attr-defined]


def _keys(value: float, _: object) -> str:
    return f"{value / 1e6:g}M" if value >= 1e6 else f"{value / 1e3:g}k" if value else "0"


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """The same nearest-rank percentile as bench/_common.py, so the marks match the JSON."""
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def plot_propagation(latencies_ms: Sequence[float] | Mapping[str, Sequence[float]], path: Path | str,
                     *, target_ms: float = PROPAGATION_TARGET_MS, title: str | None = None) -> Path:
    """The latency CDF with p50 and p99 marked. A mapping draws one curve per label (before and
    after from one run), which is how a regression or a fix is read."""
    series = dict(latencies_ms) if isinstance(latencies_ms, Mapping) else {"": latencies_ms}
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for label, values in series.items():
        ordered = sorted(values)
        if not ordered:
            continue
        fractions = [(index + 1) / len(ordered) for index in range(len(ordered))]
        p50, p99 = _percentile(ordered, 0.5), _percentile(ordered, 0.99)
        prefix = f"{label}: " if label else ""
        line = axes.step(ordered, fractions, where="post", label=f"{prefix}p50 {p50:.0f} ms, p99 {p99:.0f} ms")[0]
        axes.plot([p50, p99], [0.5, 0.99], "o", color=line.get_color())
        axes.annotate("p50", (p50, 0.5), textcoords="offset points", xytext=(6, -10), color=line.get_color())
        axes.annotate("p99", (p99, 0.99), textcoords="offset points", xytext=(6, -10), color=line.get_color())
    axes.axvline(target_ms, color="crimson", linestyle="--", label=f"target p99 {target_ms:.0f} ms")
    longest = max((max(values) for values in series.values() if len(values)), default=target_ms)
    if longest > 8 * target_ms:  # a long tail: a log axis keeps the body of the curve readable
        axes.set_xscale("log")
        axes.set_xlabel("publish to every process blocking the tenant (ms, log scale)")
    else:
        axes.set_xlim(left=0)
        axes.set_xlabel("publish to every process blocking the tenant (ms)")
    axes.set_ylabel("fraction of trials")
    axes.set_ylim(0, 1.05)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(title or "Notice propagation")
    return _save(figure, path)


def plot_overshoot(admitted: Sequence[tuple[float, float]], limit: float, notices: Mapping[str, float],
                   path: Path | str, *, title: str | None = None) -> Path:
    """Tokens the fleet admitted over time (seconds from the fleet's first call) against the limit,
    each instance's notice arrival marked on the curve: the whole run on the left, the moments
    around the crossing on the right, where the gap between the crossing and the last arrival is
    what the overshoot is made of."""
    points = sorted(admitted)
    crossed = next((t for t, value in points if value >= limit), None)
    arrivals = sorted(notices.values())
    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    for axes in (whole, zoom):
        axes.step([t * 1000 for t, _ in points], [value for _, value in points], where="post", label="admitted (fleet)")
        axes.axhline(limit, color="crimson", linestyle="--", label=f"limit {limit:,.0f}")
        if crossed is not None:
            axes.axvline(crossed * 1000, color="grey", linestyle=":", label="limit crossed")
        if arrivals:
            axes.plot([t * 1000 for t in arrivals], [_admitted_at(points, t) for t in arrivals], "v", color="darkorange",
                      markersize=6, label=f"notice arrives ({len(arrivals)} instances)")
        axes.set_xlabel("time since the fleet's first call (ms)")
        axes.grid(alpha=0.3)
        _thousands(axes.yaxis)
    whole.set_ylabel("tokens admitted")
    whole.set_ylim(bottom=0)
    whole.set_title("whole run", fontsize="medium")
    if crossed is not None and points:
        last = max(points[-1][0], *arrivals) if arrivals else points[-1][0]
        before = max(0.05, (last - crossed) * 1.5)
        zoom.set_xlim((crossed - before) * 1000, (last + 0.05 * (last - crossed + before)) * 1000)
        low = _admitted_at(points, crossed - before)
        high = points[-1][1]
        zoom.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    zoom.set_title("around the crossing", fontsize="medium")
    zoom.legend(loc="lower right", fontsize="small")
    figure.suptitle(title or "Overshoot")
    return _save(figure, path)


def _admitted_at(points: Sequence[tuple[float, float]], when: float) -> float:
    value = 0.0
    for t, admitted in points:
        if t > when:
            break
        value = admitted
    return value


def plot_throughput(figures: Mapping[str, object], path: Path | str, *,
                    target_eps: float = THROUGHPUT_TARGET_EPS, title: str | None = None) -> Path:
    """Events per second of whichever stages the run measured, against the aggregator's target."""
    bars = [(label, float(value)) for key, label in THROUGHPUT_BARS
            if isinstance(value := figures.get(key), int | float) and not isinstance(value, bool)]
    figure, axes = plt.subplots(figsize=(max(8.0, 1.45 * len(bars)), 4.8))
    labels = [label for label, _ in bars]
    values = [value for _, value in bars]
    drawn = axes.bar(labels, values, color="steelblue")
    axes.bar_label(drawn, labels=[f"{value:,.0f}" for value in values], fontsize="small")
    axes.axhline(target_eps, color="crimson", linestyle="--", label=f"target {target_eps:,.0f} events/s")
    axes.set_ylabel("events per second")
    axes.tick_params(axis="x", labelsize="small")
    _thousands(axes.yaxis)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    axes.set_ylim(0, max([*values, target_eps]) * 1.15)
    axes.set_title(title or "Throughput, one run")
    return _save(figure, path)


def plot_restore(rows: Sequence[Mapping[str, float]], path: Path | str, *, target_s: float = RESTORE_TARGET_S,
                 target_mb: float = RESTORE_TARGET_MB, title: str | None = None) -> Path:
    """Restore time and peak memory against the number of tenant-period keys, side by side."""
    ordered = sorted(rows, key=lambda row: row["keys"])
    keys = [row["keys"] for row in ordered]
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(9, 4))
    time_axes.plot(keys, [row["restore_s"] for row in ordered], "o-")
    time_axes.axhline(target_s, color="crimson", linestyle="--", label=f"target {target_s:g} s")
    time_axes.set_ylabel("restore (s)")
    memory_axes.plot(keys, [row["peak_rss_mb"] for row in ordered], "o-", color="seagreen")
    memory_axes.axhline(target_mb, color="crimson", linestyle="--", label=f"target {target_mb:g} MB")
    memory_axes.set_ylabel("peak RSS (MB)")
    for axes in (time_axes, memory_axes):
        axes.set_xlabel("tenant-period keys")
        axes.set_ylim(bottom=0)
        axes.set_xlim(left=0)
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", fontsize="small")
        axes.xaxis.set_major_formatter(FuncFormatter(_keys))
    figure.suptitle(title or "Restore from the changelog")
    return _save(figure, path)
