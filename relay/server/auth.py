"""Who is on the other end: AUTH and REGISTER checks.

The only place the server touches PyNaCl, and only to verify Ed25519
signatures: over ``b"relay-auth-v1" + server_name + challenge`` (the
challenge is the connection's, sent in HELLO) for AUTH and REGISTER, and a
signed prekey's over its 32 raw bytes for keys.publish
(:func:`verify_signed_prekey`). :func:`check_auth` and :func:`register`
return the authenticated (user, device) or raise :class:`FrameError`
carrying the ERROR and the close code 1008 that PROTOCOL.md asks for.
"""

from __future__ import annotations

import nacl.bindings
import nacl.exceptions
import nacl.signing

from relay.errors import (
    BAD_REQUEST,
    CLOSE_POLICY,
    FORBIDDEN,
    UNAUTHORIZED,
    FrameError,
)
from relay.protocol import frames
from relay.server.clock import now_ms
from relay.server.context import ServerContext
from relay.server.wire_errors import wire_error
from relay.store.base import RegisterUser

AUTH_CONTEXT = b"relay-auth-v1"


def signed_message(server_name: str, challenge: bytes) -> bytes:
    return AUTH_CONTEXT + server_name.encode() + challenge


def verify(key: bytes, message: bytes, sig: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(key).verify(message, sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError, ValueError):
        return False
    return True


def verify_signed_prekey(identity_key: bytes, prekey: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is the device's Ed25519 signature over the signed
    prekey's 32 raw bytes (the e2e profile's "Identity and prekeys")."""
    return verify(identity_key, prekey, sig)


def check_auth(ctx: ServerContext, challenge: bytes, event: frames.Auth) -> tuple[str, int]:
    """An existing device: unknown user, unknown device and bad signature are one 401."""
    record = ctx.store.get_user(event.user)
    key = None if record is None else record.devices.get(event.device)
    if key is None or not verify(key, signed_message(ctx.settings.server_name, challenge), event.sig):
        raise FrameError(UNAUTHORIZED, "authentication failed", ref=frames.AUTH, close=CLOSE_POLICY)
    return event.user, event.device


async def register(ctx: ServerContext, challenge: bytes, event: frames.Register) -> tuple[str, int]:
    """A new account: token, usable key, signature, then the durable record (device 1)."""
    ref = frames.REGISTER
    token = ctx.settings.registration_token
    if token is not None and event.token != token:
        raise FrameError(FORBIDDEN, "registration token refused", ref=ref, close=CLOSE_POLICY)
    try:
        nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(event.identity_key)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, ValueError):
        raise FrameError(BAD_REQUEST, "identity_key is not a usable Ed25519 key", ref=ref, close=CLOSE_POLICY) from None
    if not verify(event.identity_key, signed_message(ctx.settings.server_name, challenge), event.sig):
        raise FrameError(UNAUTHORIZED, "bad signature", ref=ref, close=CLOSE_POLICY)
    result = await ctx.writer_for(event.user).call(RegisterUser(event.user, event.identity_key, now_ms()))
    if isinstance(result, BaseException):
        raise wire_error(result, ref=ref, close=CLOSE_POLICY, reason=str(result))
    return event.user, 1
