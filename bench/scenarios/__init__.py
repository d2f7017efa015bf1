"""Scenario registry. A scenario is a module with:

* ``DESCRIPTION: str`` -- one line for ``--help``;
* ``HEADLINE: tuple[str, str]`` -- (result key, unit) compared across targets
  in ``ratios`` (higher is better);
* ``add_arguments(parser)`` -- its own options;
* ``run(url, relay_pid, args, alive=None) -> dict`` -- one target, JSON-ready
  figures (``ok=False`` with ``error`` keeps the figures of a partial run);
* ``table(result) -> list[tuple[str, str]]`` -- readable (label, value) rows;
* optionally ``median_by(result) -> float`` -- which round ``--repeat`` reports
  (default: the median headline).

Optional: ``DEFAULT_TARGETS`` (e.g. ``"fast,pure"``) and ``WANTS_RUNNING = True``
(``run`` then also gets ``running=``, the :class:`bench.targets.Running`, for
scenarios that stop and relaunch the relay); ``NO_RELAY = True`` for a
client-side micro-benchmark (no relay is spawned; it runs once per round as
target ``client``, ``url`` is ``""``, ``implementation()`` names what it
measures); ``variants(args) -> [(label, args)]`` to run the same scenario
with other options against every target, interleaved per round (a non-empty
label makes the result's target ``NAME+label``, e.g. ``fast+e2ee``).

Target ``mosquitto``: ``SUPPORTS_MQTT = True`` lets a scenario run against it
(``run`` then gets an ``mqtt://`` URL and the broker's PID);
``mosquitto_options(args) -> tuple[MqttOption, ...]`` sets lines of the
broker's generated config for the run (each with its reason, which goes into
the result's ``notes``). ``extra_ratios(results) -> dict`` adds entries to the
JSON's ``ratios`` (``fanout``: one per group size).
"""

from __future__ import annotations

import importlib
from types import ModuleType

SCENARIOS: dict[str, str] = {
    "pairs": "bench.scenarios.pairs",
    "latency": "bench.scenarios.latency",
    "fanout": "bench.scenarios.fanout",
    "drain": "bench.scenarios.drain",
    "restart": "bench.scenarios.restart",
    "idle": "bench.scenarios.idle",
    "e2ee": "bench.scenarios.e2ee",
}


def load(name: str) -> ModuleType:
    try:
        return importlib.import_module(SCENARIOS[name])
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
