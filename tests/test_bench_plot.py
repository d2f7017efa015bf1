"""``python -m bench --plot``: bench/plot.py draws small fake documents (shaped
like real runs) into PNGs; without matplotlib the option fails before the run."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench.plot import INSTALL_HINT, PlotUnavailable, plot_document
from bench.stats import HIST_PER_DECADE, summarize_ns

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu_model": "AMD EPYC", "cores": 2, "python": "3.11.7", "kernel": "6.18", "date": "2026-12-03T00:54:31+00:00"}


def latency_summary(seed: int, median_ms: float, p999: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    samples = [int(rng.lognormvariate(0, 0.6) * median_ms * 1e6) for _ in range(2000)]
    return summarize_ns(samples, (0.5, 0.99, 0.999) if p999 else (0.5, 0.99), histogram=True)


def relay_result(target: str, i: int, **figures: Any) -> dict[str, Any]:
    return {"target": target, "pid": 1000 + i, "implementation": "cython", "git": "a6ba128", "notes": [], "ok": True,
            "anomalies": [], **figures}


def document(scenario: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"scenario": scenario, "command": f"python -m bench {scenario}", "machine": MACHINE,
            "pinning": {}, "results": results, "ratios": {}}


def latency_doc() -> dict[str, Any]:
    return document("latency", [
        relay_result(
            target, i, measured_seconds=3.0, msgs_per_s=rate, offered_per_s=1000.0, cpu_us_per_msg=cpu,
            latency_ms={"send_to_msg": latency_summary(i, median), "send_to_sent": {"n": 0}},
            window_counts={"sends": 3000, "msgs": 3000, "completed": 2998},
            params={"pairs": 100, "rate": 1000.0, "payload_bytes": 100, "ack": "message", "framing": framing},
        )
        for i, (target, rate, cpu, median, framing) in enumerate((
            ("fast", 999.1, 495.2, 3.3, "single"),
            ("mosquitto", 1000.3, 114.9, 0.15, "one MQTT packet per message"),
        ))
    ])


def pairs_doc() -> dict[str, Any]:
    return document("pairs", [
        relay_result("fast", 0, measured_seconds=3.0, msgs_per_s=42860.8, cpu_us_per_msg=17.3,
                     latency_ms={"send_to_msg": latency_summary(1, 22.0, p999=False)},
                     params={"pairs": 100, "window": 64, "framing": "packed", "ack": "message", "e2ee": False},
                     repeats=[28814.7, 42860.8, 45120.0]),
        relay_result("naive", 1, measured_seconds=3.0, msgs_per_s=5100.0, cpu_us_per_msg=None,
                     latency_ms={"send_to_msg": latency_summary(2, 120.0, p999=False)},
                     params={"pairs": 100, "window": 64, "framing": "packed", "ack": "message", "e2ee": False},
                     repeats=[5100.0, None, 5300.0]),
        {"target": "pure", "ok": False, "error": "TargetError: no 'listening' within 60 s"},
    ])


def fanout_doc() -> dict[str, Any]:
    def size(members: int, rate: float, cpu: float, median: float) -> dict[str, Any]:
        return {"members": members, "receivers": members - 1, "deliveries_per_s": rate, "cpu_us_per_delivery": cpu,
                "latency_ms": {"send_to_sent": {"n": 0}, "send_to_last_member": latency_summary(members, median)}}

    return document("fanout", [
        relay_result("fast", 0, deliveries_per_s=95450.0, headline_members=1024,
                     by_size=[size(16, 21681.0, 26.0, 16.0), size(1024, 95450.0, 10.1, 330.0)],
                     params={"members": [16, 1024], "window": 32, "max_undelivered": 512, "seconds": 3.0}),
    ])


@pytest.mark.parametrize("make", [latency_doc, pairs_doc, fanout_doc], ids=["latency", "pairs", "fanout"])
def test_plot_document_writes_a_png(make: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    plot_document(make(), path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # a figure with panels, not an empty canvas


def test_plot_document_without_figures_still_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "failed.png"
    plot_document(document("restart", [{"target": "fast", "ok": False, "error": "relay exited"}]), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_histogram_counts_every_sample_in_its_bucket() -> None:
    samples = [1, 999_999, 1_000_000, 1_130_000, 50_000_000, 10**15]  # ns: below 1 µs, near 1 ms, above 100 s
    hist = summarize_ns(samples, histogram=True)["hist"]
    assert hist["per_decade"] == HIST_PER_DECADE
    assert sum(hist["counts"]) == len(samples)
    assert hist["first"] == -3 * HIST_PER_DECADE  # 1 ns lands in the 1 µs bucket
    assert len(hist["counts"]) == 8 * HIST_PER_DECADE  # 1 µs … 100 s, and no further
    ms_bucket = 0 - hist["first"]  # [1, 1.122) ms; its neighbours: [0.891, 1), [1.122, 1.259)
    assert hist["counts"][ms_bucket - 1 : ms_bucket + 2] == [1, 1, 1]
    assert summarize_ns([], histogram=True)["hist"]["counts"] == []


def test_plot_without_matplotlib_fails_before_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError

    def no_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("the benchmark ran although --plot cannot draw")

    monkeypatch.setattr(bench_main, "run_one", no_run)
    monkeypatch.setattr(bench_main, "pin_self", no_run)
    code = bench_main.main(["latency", "--targets", "fast", "--plot", str(tmp_path / "lat.png")])
    assert code == 2
    assert capsys.readouterr().err == INSTALL_HINT + "\n"
    with pytest.raises(PlotUnavailable, match="pip install"):
        plot_document(latency_doc(), tmp_path / "lat.png")
    assert not (tmp_path / "lat.png").exists()
