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


SERVER = ROOT / "server"


def server_imports(path: Path) -> set[str]:
    """The relay.server modules ``path`` imports, anywhere in it: at the top,
    inside functions and under ``if TYPE_CHECKING:`` alike (a typing-only
    circle is still a circle)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .x import y
                base = "relay.server" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = {f"relay.server.{p.stem}" for p in SERVER.glob("*.py")}
    return (found & modules) - {f"relay.server.{path.stem}"}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_import_cycle_finds_a_circle() -> None:
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_server_modules_import_only_downward() -> None:
    # context <- handlers (requests, auth, groups, keys, parking) <- connection <- app:
    # handlers get a ServerContext, never the RelayServer (docs/architecture.md).
    graph = {f"relay.server.{p.stem}": server_imports(p) for p in SERVER.glob("*.py")}
    cycle = import_cycle(graph)
    assert cycle is None, "import circle in relay/server: " + " -> ".join(cycle or [])
    importers_of_app = sorted(name for name, deps in graph.items() if "relay.server.app" in deps)
    assert importers_of_app == [], "only the entry points import relay.server.app"


def test_the_context_is_below_every_handler() -> None:
    allowed = {"relay.server.flush", "relay.server.reactor", "relay.server.router", "relay.server.writer", "relay.server.clock"}
    found = server_imports(SERVER / "context.py")
    assert found <= allowed, found - allowed
