"""End-to-end encryption, profile ``relay-v1`` (PROTOCOL.md): pure code, no I/O.

Identity keys and prekeys, X3DH, the Double Ratchet, the pairwise payload,
Sender Keys for groups, media blobs and safety numbers. Every refusal is an
:class:`~relay.e2ee.errors.E2EEError` subclass; see ``docs/e2e.md``.
"""
