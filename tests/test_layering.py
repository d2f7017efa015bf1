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


@pytest.mark.parametrize("path", sorted((ROOT / "e2ee").glob("*.py")), ids=lambda p: p.name)
def test_e2ee_is_pure(path: Path) -> None:
    # Crypto without I/O: libsodium, msgpack and hashing only; ``os`` for
    # os.urandom, the default randomness (never files, never a clock).
    allowed = STDLIB_OK | {"hmac", "msgpack", "nacl", "relay.e2ee", "relay.protocol.frames"}
    found = {name for name in imports(path) if not name.startswith("relay.e2ee.")}
    assert found <= allowed, found - allowed
    assert "trio" not in found and "time" not in found and "socket" not in found


def test_the_relay_never_imports_client_crypto() -> None:
    # The relay holds no private key and decrypts nothing: keeping relay/e2ee
    # out of the server and store makes that visible in the imports.
    server_side = sorted((ROOT / "server").glob("*.py")) + sorted((ROOT / "store").glob("*.py"))
    assert not [p.name for p in server_side if any(n.startswith("relay.e2ee") for n in imports(p))]
