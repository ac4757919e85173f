"""Envelope encoding and the ``{message type: handler}`` dispatch table (DESIGN.md §2).

A ZeroMQ message is ``[envelope, *blobs]``: frame 0 is a serialized :class:`Envelope`
(protobuf, a few hundred bytes); the only extra frames are encoded media files the client
sent (``EncodeRequest`` images). Tensors never appear here — see ``epd.transfer``.
Pickle is never used on a socket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from epd.wire.gen import epd_pb2 as pb

logger = logging.getLogger(__name__)

# Fields of the Envelope oneof, in declaration order.
PAYLOAD_FIELDS: tuple[str, ...] = tuple(
    f.name for f in pb.Envelope.DESCRIPTOR.oneofs_by_name["payload"].fields
)
_FIELD_BY_TYPE: dict[str, str] = {
    pb.Envelope.DESCRIPTOR.fields_by_name[name].message_type.name: name for name in PAYLOAD_FIELDS
}


class WireError(ValueError):
    """A frame is not a valid Envelope, or carries no payload."""


def pack(msg: Any, sender: str) -> bytes:
    """Wrap one payload message in an Envelope and serialize it.

    Args:
        msg: any message of the Envelope ``payload`` oneof (e.g. ``pb.KvReady``); its
            ``request_id`` is copied to the envelope.
        sender: instance id of the sending process.

    Returns:
        The serialized envelope (bytes; typically < 1 KiB).

    Raises:
        WireError: ``msg`` is not a payload type.
    """
    field = _FIELD_BY_TYPE.get(type(msg).DESCRIPTOR.name)
    if field is None:
        raise WireError(f"{type(msg).__name__} is not an Envelope payload")
    env = pb.Envelope(request_id=getattr(msg, "request_id", ""), sender=sender)
    getattr(env, field).CopyFrom(msg)
    return env.SerializeToString()


def unpack(frame: bytes) -> tuple[pb.Envelope, str, Any]:
    """Parse frame 0 of a message.

    Returns:
        ``(envelope, payload field name, payload message)``.

    Raises:
        WireError: not a parseable Envelope, or no payload set.
    """
    env = pb.Envelope()
    try:
        env.ParseFromString(frame)
    except DecodeError as exc:
        raise WireError(f"undecodable envelope ({len(frame)} bytes): {exc}") from exc
    field = env.WhichOneof("payload")
    if field is None:
        raise WireError("envelope without payload")
    return env, field, getattr(env, field)


Handler = Callable[[pb.Envelope, Any, list[bytes]], None]


class Dispatcher:
    """Routes each incoming message to the handler registered for its payload type.

    A table, not an ``if/elif`` chain (STYLE.md): ``Dispatcher({"kv_ready": on_kv_ready})``.
    Messages of a type without a handler are logged and dropped.
    """

    def __init__(self, handlers: dict[str, Handler]) -> None:
        unknown = set(handlers) - set(PAYLOAD_FIELDS)
        if unknown:
            raise WireError(f"no such payload type(s): {sorted(unknown)}")
        self.handlers = handlers

    def dispatch(self, frames: list[bytes]) -> None:
        """Decode ``frames`` and call the handler. Raises :class:`WireError` on a bad frame."""
        env, field, payload = unpack(frames[0])
        handler = self.handlers.get(field)
        if handler is None:
            logger.warning("request %s: no handler for %s from %s, dropped", env.request_id, field, env.sender)
            return
        handler(env, payload, frames[1:])
