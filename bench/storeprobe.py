"""Read-only look into the relay's LMDB files from outside the relay.

Used by ``fanout`` to check "body stored once": entry counts of the named
databases (``bodies``, ``inbox``, ...) of every shard, read through a
separate read-only LMDB environment (LMDB is multi-process safe; a reader
holds no lock the relay's writers wait for). This depends on the store's
layout (``relay/store/lmdb_store.py``: one directory ``shard-NNN`` per shard,
named databases); when the layout is not found the probe reports nothing
rather than guessing.
"""

from __future__ import annotations

from pathlib import Path

import lmdb
import psutil

DATABASES = (b"users", b"inbox", b"meta", b"idem", b"groups", b"bodies", b"fanout")


def data_dir_of(pid: int | None) -> Path | None:
    """The ``--data`` directory of a running ``relay serve`` (None if unknown)."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        cmd = proc.cmdline()
        cwd = Path(proc.cwd())
    except psutil.Error:
        return None
    for i, arg in enumerate(cmd):
        value = None
        if arg == "--data" and i + 1 < len(cmd):
            value = cmd[i + 1]
        elif arg.startswith("--data="):
            value = arg.split("=", 1)[1]
        if value is not None:
            path = Path(value)
            return path if path.is_absolute() else cwd / path
    return None


def entry_counts(data_dir: Path) -> dict[str, int] | None:
    """Entries per named database, summed over shards; None if the layout is not there."""
    shards = sorted(p for p in data_dir.glob("shard-*") if (p / "data.mdb").exists())
    if not shards:
        return None
    totals = {name.decode(): 0 for name in DATABASES}
    for path in shards:
        env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=len(DATABASES) + 1, create=False)
        try:
            with env.begin() as txn:
                for name in DATABASES:
                    try:
                        db = env.open_db(name, txn=txn, create=False)
                    except lmdb.NotFoundError:
                        continue
                    totals[name.decode()] += int(txn.stat(db)["entries"])
        finally:
            env.close()
    return totals
