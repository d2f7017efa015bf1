"""The layering rules of STYLE.md, enforced: pure parts import no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "relay"
STDLIB_OK = {"__future__", "base64", "collections", "dataclasses", "enum", "hashlib", "os", "re", "struct", "types", "typing", "zlib", "json", "pathlib"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0] if node.module.split(".")[0] != "relay" else node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").glob("*.py")) + [ROOT / "_fastpath_py.py"], ids=lambda p: p.name)
def test_protocol_and_fastpath_are_pure(path: Path) -> None:
    # h11 is itself sans-I/O; it parses the opening handshake.
    allowed = STDLIB_OK | {"msgpack", "h11", "relay.errors", "relay.protocol", "relay.protocol.frames"}
    assert imports(path) <= allowed, imports(path) - allowed


@pytest.mark.parametrize("path", sorted((ROOT / "store").glob("*.py")), ids=lambda p: p.name)
def test_store_has_no_trio(path: Path) -> None:
    assert not {"trio", "trio_websocket"} & imports(path)


def test_server_uses_nacl_only_for_auth() -> None:
    users = [p.name for p in (ROOT / "server").glob("*.py") if "nacl" in imports(p)]
    assert users == ["auth.py"], "PyNaCl only verifies AUTH/REGISTER signatures, in one module"
