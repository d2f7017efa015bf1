"""Group membership rules, sans I/O.

:func:`apply_change` takes a group's current :class:`GroupInfo`, the acting
user and a ``group.*`` op with its args, and returns the new info (or the
same object when nothing changes) plus the users to notify, or raises
:class:`FrameError` (403 not allowed, 400 bad args, 413 too many members).
The store calls it inside the write transaction, so checks and the write are
atomic.

Rules (PROTOCOL.md "Group rules"): the creator is the first admin; only
admins add, remove, rename, promote, demote; any member may leave; when the
last admin leaves, the longest-standing remaining member is promoted; a
change that changes nothing keeps ``version``; every other change bumps it
by one; removed members are notified of their removal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from relay.errors import BAD_REQUEST, FORBIDDEN, TOO_LARGE, FrameError
from relay.protocol.frames import is_user

MAX_NAME_LEN = 128


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group: str
    name: str
    version: int
    members: tuple[str, ...]
    admins: tuple[str, ...]

    def as_result(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "version": self.version,
            "members": list(self.members),
            "admins": list(self.admins),
        }

    def event_body(self, actor: str) -> dict[str, Any]:
        body = self.as_result()
        body["actor"] = actor
        return body


def check_name(value: object) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_NAME_LEN:
        raise FrameError(BAD_REQUEST, f"name must be a string of 1-{MAX_NAME_LEN} characters")
    return value


def check_users(value: object, field: str = "members") -> list[str]:
    if type(value) is not list or not all(is_user(u) for u in value):
        raise FrameError(BAD_REQUEST, f"{field} must be a list of user names")
    # Keep the caller's order, drop repeats.
    return list(dict.fromkeys(value))


def new_group(group: str, creator: str, name: object, members: object, max_members: int) -> GroupInfo:
    others = [u for u in check_users(members) if u != creator]
    if 1 + len(others) > max_members:
        raise FrameError(TOO_LARGE, f"a group has at most {max_members} members")
    return GroupInfo(group, check_name(name), 1, (creator, *others), (creator,))


def apply_change(
    info: GroupInfo, actor: str, op: str, args: dict[Any, Any], max_members: int
) -> tuple[GroupInfo, tuple[str, ...]]:
    """Return (new info, users to notify). Notify = members after the change
    plus anyone the change removed; empty when nothing changed."""
    if actor not in info.members:
        raise FrameError(FORBIDDEN, "not a member of that group")
    is_admin = actor in info.admins
    members, admins = list(info.members), list(info.admins)
    removed: list[str] = []
    if op == "group.info":
        return info, ()
    if op == "group.leave":
        members.remove(actor)
        removed.append(actor)
        if actor in admins:
            admins.remove(actor)
        if not admins and members:
            admins.append(members[0])
    elif not is_admin:
        raise FrameError(FORBIDDEN, "only admins may do that")
    elif op == "group.rename":
        name = check_name(args.get("name"))
        if name == info.name:
            return info, ()
        changed = replace(info, name=name, version=info.version + 1)
        return changed, changed.members
    elif op == "group.add":
        for user in check_users(args.get("members")):
            if user not in members:
                members.append(user)
        if len(members) > max_members:
            raise FrameError(TOO_LARGE, f"a group has at most {max_members} members")
    elif op == "group.remove":
        for user in check_users(args.get("members")):
            if user in members:
                members.remove(user)
                removed.append(user)
                if user in admins:
                    admins.remove(user)
        if not admins and members:
            admins.append(members[0])
    elif op == "group.promote":
        targets = check_users(args.get("members"))
        if any(u not in members for u in targets):
            raise FrameError(BAD_REQUEST, "only members can be promoted")
        admins.extend(u for u in targets if u not in admins)
    elif op == "group.demote":
        targets = check_users(args.get("members"))
        admins = [a for a in admins if a not in targets]
        if not admins:
            raise FrameError(FORBIDDEN, "a group needs at least one admin")
    else:
        raise FrameError(BAD_REQUEST, f"unknown op {op!r}")
    if tuple(members) == info.members and tuple(admins) == info.admins:
        return info, ()
    changed = replace(info, version=info.version + 1, members=tuple(members), admins=tuple(admins))
    return changed, (*changed.members, *removed)
