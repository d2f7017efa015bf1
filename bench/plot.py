"""``python -m bench SCENARIO --plot FILE.png``: the run's JSON document drawn.

matplotlib is the optional extra ``bench`` (``pip install -e '.[bench]'``):
the relay, the tests and a plain bench run do not need it, so it is imported
here only, inside the functions, and only when ``--plot`` is asked for.

One figure, a panel per kind of data the document has:

* latency CDF per target, from the ``hist`` of ``send_to_msg`` (``pairs``,
  ``latency``) or ``send_to_last_member`` per group size (``fanout``), with
  the exact percentiles marked;
* the headline per ``--repeat`` round (``pairs`` and ``latency`` always; the
  other scenarios when they ran more than one round), ``fanout``'s
  deliveries/s per group size, ``drain``'s store and drain rates;
* relay CPU µs per message (per delivery for ``fanout``);
* ``restart``: ms to READY per restart; ``idle``: KiB per connection against
  the connection count; ``e2ee``: µs per message and per operation.

A panel without data is left out, and failed targets are named in the title.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

INSTALL_HINT = "--plot needs matplotlib: pip install -e '.[bench]'"

# (result key, axis label) of each scenario's headline, for the per-round panel.
HEADLINES: dict[str, tuple[str, str]] = {
    "pairs": ("msgs_per_s", "msg/s (full cycle)"),
    "latency": ("msgs_per_s", "msg/s completed"),
    "fanout": ("deliveries_per_s", "deliveries/s (largest group)"),
    "drain": ("drain_msgs_per_s", "msg/s drained"),
    "restart": ("ready_ms", "ms to READY"),
    "idle": ("kib_per_conn", "KiB per connection"),
    "e2ee": ("message_us", "µs per message"),
}
# Throughput is what these two are about: a per-round panel even for one round.
ALWAYS_ROUNDS = ("pairs", "latency")
# The params worth a place in the title, in that order.
TITLE_PARAMS: dict[str, tuple[str, ...]] = {
    "pairs": ("pairs", "window", "framing", "ack", "e2ee"),
    "latency": ("rate", "pairs", "framing", "ack"),
    "fanout": ("members", "window", "max_undelivered", "seconds"),
    "drain": ("senders", "per_sender", "one_device"),
    "restart": ("senders", "per_sender", "sync", "restarts"),
    "idle": ("connections", "procs"),
    "e2ee": ("iterations", "rounds", "skipped"),
}
LINESTYLES = ("-", "--", ":", "-.")

Panel = Callable[["Axes"], None]


class PlotUnavailable(Exception):
    """matplotlib is not installed: ``str(exc)`` is the one line to print."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable` unless matplotlib imports; called before
    a run, so a missing extra does not cost a whole benchmark."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(INSTALL_HINT) from exc


def plot_document(doc: dict[str, Any], path: Path) -> None:
    """Draw ``doc`` (what ``python -m bench`` prints) into the PNG ``path``."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = collect_panels(doc)
    n = max(1, len(panels))
    cols = n if n <= 3 else 2
    rows = math.ceil(n / cols)
    # A Figure with an Agg canvas, not pyplot: no GUI backend is ever chosen
    # and the caller's global matplotlib state is left alone.
    fig = Figure(figsize=(6.4 * cols, 4.8 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    if panels:
        for ax, panel in zip(axes, panels, strict=False):
            panel(ax)
    else:
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "nothing to draw: no target has figures", ha="center", va="center")
    for ax in axes[len(panels) if panels else 1 :]:
        fig.delaxes(ax)
    fig.suptitle(title(doc), fontsize=11)
    # format="png" whatever the name ends with: matplotlib would otherwise
    # append ".png" to a name without an extension.
    fig.savefig(path, format="png", dpi=100)


def collect_panels(doc: dict[str, Any]) -> list[Panel]:
    scenario = str(doc.get("scenario", ""))
    results = ok_results(doc)
    if not results:
        return []
    colors = {r["target"]: f"C{i}" for i, r in enumerate(results)}
    candidates: list[Panel | None] = [latency_cdf(results, colors)]
    if scenario in ALWAYS_ROUNDS or any(len(r.get("repeats") or []) > 1 for r in results):
        candidates.append(rounds(scenario, results, colors))
    candidates += [
        fanout_rates(results),
        drain_rates(results),
        restart_ready(results),
        idle_memory(results, colors),
        e2ee_message(results),
        e2ee_ops(results),
        cpu_per_message(results),
    ]
    return [p for p in candidates if p is not None]


def ok_results(doc: dict[str, Any]) -> list[dict[str, Any]]:
    # A failed target's partial figures would be drawn as if they were good ones.
    return [r for r in doc.get("results", []) if isinstance(r, dict) and r.get("ok") and r.get("target")]


def title(doc: dict[str, Any]) -> str:
    scenario = str(doc.get("scenario", "?"))
    results = ok_results(doc)
    # Mosquitto's params describe MQTT (its framing, its ack): the relays' say what was asked.
    relay_results = [r for r in results if r["target"] != "mosquitto"] or results
    params: dict[str, Any] = relay_results[0].get("params", {}) if relay_results else {}
    parts = []
    for key in TITLE_PARAMS.get(scenario, ()):
        value = params.get(key)
        if value is None or value is False:
            continue
        if value is True:
            parts.append(key.replace("_", " "))
        elif key == "rate" and number(value) is not None:
            parts.append(f"{value:,.0f} msg/s offered")
        elif key == "seconds" and number(value) is not None:
            parts.append(f"{value:g} s measured")
        elif isinstance(value, list):
            parts.append(f"{key.replace('_', ' ')} {'/'.join(str(v) for v in value)}")
        else:
            parts.append(f"{key.replace('_', ' ')} {value}")
    seconds = relay_results[0].get("measured_seconds") if relay_results else None
    if seconds:
        parts.append(f"{seconds:.0f} s measured")
    rounds_ = max((len(r.get("repeats") or []) for r in results), default=0)
    if rounds_ > 1:
        parts.append(f"median of {rounds_} rounds")
    failed = [str(r.get("target")) for r in doc.get("results", []) if not r.get("ok")]
    targets = ", ".join(r["target"] for r in results) or "none"
    line = f"{scenario}: {', '.join(parts)}" if parts else scenario
    line += f" — targets: {targets}" + (f" (failed: {', '.join(failed)})" if failed else "")
    m = doc.get("machine") or {}
    if m:
        date = str(m.get("date", ""))[:16].replace("T", " ")
        git = next((r["git"] for r in results if r.get("git")), None)
        line += f"\n{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, {date} UTC" + (f", tree {git}" if git else "")
    return line


def number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def grouped_bars(
    ax: Axes,
    categories: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None], str | None]],
    fmt: str = "{:,.0f}",
) -> None:
    """Bars per category, one per (label, values, color) series; None: no bar."""
    width = 0.8 / max(1, len(series))
    for i, (label, values, color) in enumerate(series):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        heights = [math.nan if v is None else v for v in values]
        bars = ax.bar(xs, heights, width, label=label, color=color)
        ax.bar_label(bars, labels=["" if v is None else fmt.format(v) for v in values], fontsize=8)
    ax.set_xticks(range(len(categories)), list(categories))
    ax.margins(y=0.12)  # room for the bar labels
    if len(series) > 1:
        top_legend(ax)


def top_legend(ax: Axes) -> None:
    """A one-row legend in room made above the bars (anywhere else it hides one)."""
    handles, _ = ax.get_legend_handles_labels()
    ax.margins(y=0.3)
    ax.legend(fontsize=8, loc="upper center", ncols=min(4, len(handles)))


def target_bars(ax: Axes, results: list[dict[str, Any]], values: Sequence[float | None], fmt: str) -> None:
    """One bar per target (the x axis names them, no legend needed)."""
    colors = [f"C{i}" for i in range(len(results))]
    heights = [math.nan if v is None else v for v in values]
    bars = ax.bar([r["target"] for r in results], heights, color=colors)
    ax.bar_label(bars, labels=["n/a" if v is None else fmt.format(v) for v in values], fontsize=8)
    ax.margins(y=0.12)


# -- latency ------------------------------------------------------------------


def cdf_points(hist: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """(ms, fraction ≤ ms) at the bucket edges of a :func:`bench.stats.histogram_ns`."""
    counts = hist.get("counts") or []
    per_decade = hist.get("per_decade")
    first = hist.get("first")
    total = sum(counts)
    if not total or not per_decade or first is None:
        return None
    xs = [10 ** (first / per_decade)]
    ys = [0.0]
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        xs.append(10 ** ((first + i + 1) / per_decade))
        ys.append(seen / total)
    return xs, ys


def latency_cdf(results: list[dict[str, Any]], colors: dict[str, str]) -> Panel | None:
    # (label, summary, color, linestyle) per curve
    curves: list[tuple[str, dict[str, Any], str, str]] = []
    what = "SEND→MSG"
    single_target = len(results) == 1
    for r in results:
        lat = r.get("latency_ms") or {}
        if "send_to_msg" in lat:
            curves.append((r["target"], lat["send_to_msg"], colors[r["target"]], "-"))
        for j, size in enumerate(r.get("by_size") or []):
            what = "SEND_GROUP→last member"
            summary = (size.get("latency_ms") or {}).get("send_to_last_member") or {}
            label = f"{r['target']}, {size.get('members')} members"
            # One target: a colour per group size reads better than line styles.
            color = f"C{j}" if single_target else colors[r["target"]]
            style = "-" if single_target else LINESTYLES[j % len(LINESTYLES)]
            curves.append((label, summary, color, style))
    drawable = [(c, cdf_points(c[1].get("hist") or {})) for c in curves]
    drawable = [(c, pts) for c, pts in drawable if pts is not None]
    if not drawable:
        return None

    def draw(ax: Axes) -> None:
        for (label, summary, color, style), pts in drawable:
            assert pts is not None
            marks: list[tuple[str, float, float]] = []
            for key, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
                v = number(summary.get(key))
                if v is not None:
                    marks.append((key, q, v))
            tag = " / ".join(f"{key} {v:g}" for key, _, v in marks)
            ax.plot(pts[0], pts[1], color=color, linestyle=style, label=f"{label}: {tag} ms" if tag else label)
            # The exact percentiles (from the samples), on top of the bucketed curve.
            ax.plot([v for _, _, v in marks], [q for _, q, _ in marks], "o", color=color, markersize=4)
        readable_log_x(ax, [x for _, pts in drawable if pts is not None for x in pts[0]])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("fraction ≤ x")
        ax.set_title(f"{what} latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")

    return draw


def readable_log_x(ax: Axes, xs: Sequence[float]) -> None:
    """A log x axis labelled in plain numbers (0.2, 5, 300), not 2×10⁻¹, with
    labelled ticks between the decades when there are few decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = min(xs), max(xs)
    decades = math.log10(hi / lo) if lo > 0 else 99.0
    subs: tuple[float, ...] = (2, 3, 5) if decades <= 1.5 else (2, 5) if decades <= 3 else ()
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    if subs:
        ax.xaxis.set_minor_locator(LogLocator(subs=subs))
        ax.xaxis.set_minor_formatter(plain)
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=8)


# -- throughput -----------------------------------------------------------------


def rounds(scenario: str, results: list[dict[str, Any]], colors: dict[str, str]) -> Panel | None:
    key, label = HEADLINES.get(scenario, ("", ""))
    if not key:
        return None
    # ``repeats`` lists every round's headline (None: a failed round); one round: the headline.
    per_target = [(r, list(r.get("repeats") or [r.get(key)])) for r in results]
    per_target = [(r, [number(v) for v in vals]) for r, vals in per_target]
    if not any(v is not None for _, vals in per_target for v in vals):
        return None
    n = max(len(vals) for _, vals in per_target)
    offered = {number(r.get("offered_per_s")) for r in results} - {None}

    def draw(ax: Axes) -> None:
        series = [(r["target"], vals + [None] * (n - len(vals)), colors[r["target"]]) for r, vals in per_target]
        grouped_bars(ax, [f"round {i + 1}" for i in range(n)], series, "{:,.0f}" if "/s" in label else "{:,.3g}")
        for rate in offered:
            assert rate is not None
            ax.axhline(rate, color="grey", linestyle="--", linewidth=1, label=f"offered {rate:,.0f} msg/s")
        if offered or len(series) == 1:
            top_legend(ax)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per round")
        ax.grid(True, axis="y", alpha=0.3)

    return draw


def fanout_rates(results: list[dict[str, Any]]) -> Panel | None:
    return by_size_bars(results, "deliveries_per_s", "deliveries/s", "deliveries/s by group size", "{:,.0f}")


def by_size_bars(results: list[dict[str, Any]], key: str, ylabel: str, title_: str, fmt: str) -> Panel | None:
    sizes = sorted({s.get("members") for r in results for s in r.get("by_size") or [] if s.get("members")})
    if not sizes:
        return None
    series = []
    for i, r in enumerate(results):
        by = {s.get("members"): number(s.get(key)) for s in r.get("by_size") or []}
        series.append((r["target"], [by.get(n) for n in sizes], f"C{i}"))
    if not any(v is not None for _, vals, _ in series for v in vals):
        return None

    def draw(ax: Axes) -> None:
        grouped_bars(ax, [f"{n} members" for n in sizes], series, fmt)
        ax.set_ylabel(ylabel)
        ax.set_title(title_)
        ax.grid(True, axis="y", alpha=0.3)

    return draw


def drain_rates(results: list[dict[str, Any]]) -> Panel | None:
    series = [
        (r["target"], [number(r.get("store_msgs_per_s")), number(r.get("drain_msgs_per_s"))], f"C{i}")
        for i, r in enumerate(results)
    ]
    if not any(v is not None for _, vals, _ in series for v in vals):
        return None

    def draw(ax: Axes) -> None:
        grouped_bars(ax, ["store (offline recipients)", "drain (on reconnect)"], series)
        ax.set_ylabel("msg/s")
        ax.set_title("store and drain msg/s")
        ax.grid(True, axis="y", alpha=0.3)

    return draw


# -- CPU ----------------------------------------------------------------------


def cpu_per_message(results: list[dict[str, Any]]) -> Panel | None:
    if any(r.get("by_size") for r in results):  # fanout: per delivery, per group size
        return by_size_bars(
            results, "cpu_us_per_delivery", "relay CPU µs per delivery", "relay CPU µs per delivery", "{:,.1f}"
        )
    if any("store_cpu_us_per_msg" in r or "drain_cpu_us_per_msg" in r for r in results):
        series = [
            (r["target"], [number(r.get("store_cpu_us_per_msg")), number(r.get("drain_cpu_us_per_msg"))], f"C{i}")
            for i, r in enumerate(results)
        ]
        if not any(v is not None for _, vals, _ in series for v in vals):
            return None

        def draw_drain(ax: Axes) -> None:
            grouped_bars(ax, ["store", "drain"], series, "{:,.1f}")
            ax.set_ylabel("relay CPU µs per message")
            ax.set_title("relay CPU µs per message")
            ax.grid(True, axis="y", alpha=0.3)

        return draw_drain
    # pairs, latency; restart reports the CPU of building its queue.
    values = [number(r.get("cpu_us_per_msg", (r.get("build") or {}).get("cpu_us_per_msg"))) for r in results]
    if not any(v is not None for v in values):
        return None
    what = "building the queue" if any("build" in r for r in results) else "message"

    def draw(ax: Axes) -> None:
        target_bars(ax, results, values, "{:,.1f}")
        ax.set_ylabel("relay CPU µs (user + sys)")
        ax.set_title(f"relay CPU µs per {what}" if what == "message" else f"relay CPU µs per message, {what}")
        ax.grid(True, axis="y", alpha=0.3)

    return draw


# -- restart, idle, e2ee --------------------------------------------------------


def restart_ready(results: list[dict[str, Any]]) -> Panel | None:
    if not any("restarts" in r for r in results):
        return None
    n = max(len(r.get("restarts") or []) for r in results)
    categories = ["empty store"] + [f"restart {i + 1}" for i in range(n)]
    series = []
    for i, r in enumerate(results):
        runs = [r.get("baseline") or {}] + list(r.get("restarts") or [])
        values = [number(x.get("ready_ms")) for x in runs]
        series.append((r["target"], values + [None] * (len(categories) - len(values)), f"C{i}"))

    def draw(ax: Axes) -> None:
        grouped_bars(ax, categories, series)
        ax.set_ylabel("ms from launch to READY")
        queued = {r.get("queued_entries") for r in results} - {None}
        ax.set_title("ms to READY" + (f", {'/'.join(f'{q:,}' for q in queued)} entries queued" if queued else ""))
        ax.grid(True, axis="y", alpha=0.3)

    return draw


def idle_memory(results: list[dict[str, Any]], colors: dict[str, str]) -> Panel | None:
    curves = []
    for r in results:
        steps = [s for s in r.get("steps") or [] if number(s.get("connections")) and number(s.get("kib_per_conn")) is not None]
        if steps:
            curves.append((r["target"], steps))
    if not curves:
        return None

    def draw(ax: Axes) -> None:
        for target, steps in curves:
            xs = [s["connections"] for s in steps]
            ax.plot(xs, [s["kib_per_conn"] for s in steps], "o-", color=colors[target], label=f"{target}: RSS / connection")
            marginal = [number(s.get("marginal_kib_per_conn")) for s in steps]
            if any(m is not None for m in marginal):
                ax.plot(xs, [math.nan if m is None else m for m in marginal], "s--", color=colors[target],
                        alpha=0.6, label=f"{target}: marginal, since the previous step")
        ax.set_xscale("log")
        # The measured counts as ticks: log-scale defaults (2×10²) are hard to read.
        ticks = sorted({s["connections"] for _, steps in curves for s in steps})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("idle authenticated connections (log)")
        ax.set_ylabel("KiB per connection")
        ax.set_title("relay memory per idle connection")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    return draw


def e2ee_message(results: list[dict[str, Any]]) -> Panel | None:
    keys = ("same_direction", "alternating", "group")
    series = []
    for i, r in enumerate(results):
        per = r.get("per_message_with_codec_us") or r.get("per_message_us") or {}
        series.append((r["target"], [number(per.get(k)) for k in keys], f"C{i}"))
    if not any(v is not None for _, vals, _ in series for v in vals):
        return None
    targets = {number(r.get("target_us")) for r in results} - {None}

    def draw(ax: Axes) -> None:
        grouped_bars(ax, [k.replace("_", " ") for k in keys], series, "{:,.1f}")
        for t in targets:
            assert t is not None
            ax.axhline(t, color="grey", linestyle="--", linewidth=1, label=f"target {t:g} µs")
        if targets:
            top_legend(ax)
        ax.set_ylabel("µs per message (encrypt + decrypt + codec)")
        ax.set_title("client E2EE cost per message")
        ax.grid(True, axis="y", alpha=0.3)

    return draw


def e2ee_ops(results: list[dict[str, Any]]) -> Panel | None:
    ops = next((r["ops_us"] for r in results if isinstance(r.get("ops_us"), dict) and r["ops_us"]), None)
    if ops is None:
        return None
    names = list(ops)

    def draw(ax: Axes) -> None:
        height = 0.8 / len(results)
        for i, r in enumerate(results):
            o = r.get("ops_us") or {}
            values = [number((o.get(k) or {}).get("median_us")) for k in names]
            ys = [y + (i - (len(results) - 1) / 2) * height for y in range(len(names))]
            ax.barh(ys, [math.nan if v is None else v for v in values], height, color=f"C{i}", label=r["target"])
        ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=7)
        ax.invert_yaxis()  # the document's order, top to bottom
        ax.set_xscale("log")
        ax.set_xlabel("µs per operation, median of rounds (log)")
        ax.set_title("client E2EE operations")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        if len(results) > 1:
            ax.legend(fontsize=8)

    return draw
