"""`relay serve` refuses bad setups with one clear line, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from relay.errors import ConfigError
from relay.store.lmdb_store import LmdbStore


def serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve", *args], capture_output=True, text=True, timeout=timeout
    )


def test_data_dir_is_locked_by_its_relay(tmp_path):
    store = LmdbStore(tmp_path / "d", shards=1, map_size=16 << 20)
    try:
        with pytest.raises(ConfigError, match="in use by another relay"):
            LmdbStore(tmp_path / "d", shards=1, map_size=16 << 20)
        result = serve("--port", "0", "--data", str(tmp_path / "d"))
        assert result.returncode == 2
        assert "in use by another relay" in result.stderr and "Traceback" not in result.stderr
    finally:
        store.close()
    LmdbStore(tmp_path / "d", shards=1, map_size=16 << 20).close()  # free again


@pytest.mark.slow
def test_port_in_use_and_bad_paths_are_one_line_errors(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve("--port", str(port), "--data", str(tmp_path / "a"))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = serve("--port", "0", "--data", str(not_a_dir))
    assert result.returncode == 2 and "is not a directory" in result.stderr
