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
    return Settings(port=0, data=str(tmp_path / "data"), fastpath=fastpath_name, shards=2)


@pytest.fixture
async def relay(settings: Settings) -> AsyncIterator[RelayServer]:
    async with open_relay(settings) as server:
        yield server
