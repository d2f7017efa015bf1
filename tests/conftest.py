from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.config import Settings
from relay.server.app import RelayServer, open_relay


def fastpath_params() -> list[str]:
    # RELAY_NO_EXT=1 builds without the extension: then only the pure twin runs.
    return ["pure"] if os.environ.get("RELAY_NO_EXT") == "1" else ["cython", "pure"]


@pytest.fixture(params=fastpath_params())
def fastpath_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(tmp_path: Path, fastpath_name: str) -> Settings:
    # RELAY_TEST_PARK_AFTER_S=0.01 runs the suite with connections parked as
    # soon as they are idle, to shake out hand-over races.
    park_after = float(os.environ.get("RELAY_TEST_PARK_AFTER_S", "2.0"))
    return Settings(port=0, data=str(tmp_path / "data"), fastpath=fastpath_name, shards=2, park_after_s=park_after)


@pytest.fixture
async def relay(settings: Settings) -> AsyncIterator[RelayServer]:
    async with open_relay(settings) as server:
        yield server
