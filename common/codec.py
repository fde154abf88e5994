"""The one wire format: msgpack envelopes, typed bodies, and tensors as (name, dtype, shape, bytes).

This is the only module that calls msgpack. Decoding is defensive: sizes and nesting are capped
before anything is allocated, unknown schema versions and kinds are refused, and tensor bytes are
checked against their declared dtype and shape before ``numpy.frombuffer`` sees them. Nothing is
ever unpickled.

Large byte strings travel after the document. An envelope is one msgpack document; a byte string
of :data:`OUT_OF_LINE_BYTES` or more in it (a tensor's values) is written as msgpack ext type 1
holding its length (8 bytes, little-endian), and the strings themselves follow the document, in
the order of their references, each starting at the next multiple of 64 bytes from the start of
the message (zero bytes pad the gaps), so that a tensor read in place is aligned. The decoder
hands them to the body as read-only views of the message, so a 47 MB update is not copied on
arrival: msgpack copies every bin it decodes, and that copy cost the aggregator more than folding
the update did. The strings must end exactly where the message does; anything else is refused.
"""

from __future__ import annotations

import hashlib
import io
import struct
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError

from common.errors import DecodeError, SchemaError
from common.messages import (
    BODY_TYPES,
    SCHEMA_VERSION,
    Body,
    Envelope,
    Kind,
    TensorPayload,
    kind_of,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "OUT_OF_LINE_ALIGN",
    "OUT_OF_LINE_BYTES",
    "array_to_tensor",
    "decode",
    "decode_record",
    "decode_tensors",
    "encode",
    "encode_record",
    "encode_tensors",
    "envelope",
    "new_id",
    "sha256_hex",
    "tensor_to_array",
]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Byte strings this long or longer travel after the document (see the module's docstring).
OUT_OF_LINE_BYTES = 64 * 1024
_OUT_OF_LINE_EXT = 1
_LENGTH = struct.Struct("<Q")
OUT_OF_LINE_ALIGN = 64
_ZEROS = bytes(OUT_OF_LINE_ALIGN)
# The document itself is small (a body's fields and the tensors' metadata): read it this much at a
# time, so that only about this much of a large message is ever copied.
_READ_SIZE = 64 * 1024
_MAX_STR = 64 * 1024
_MAX_ARRAY = 1_000_000
_MAX_MAP = 100_000

M = TypeVar("M", bound=BaseModel)


def new_id() -> str:
    """A fresh random identifier for messages, updates and requests."""
    return uuid.uuid4().hex


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def envelope(body: Body, *, sender: str, sent_at: float, message_id: str | None = None) -> Envelope:
    """Wrap a body in an envelope of the current schema."""
    return Envelope(
        kind=kind_of(body),
        message_id=message_id or new_id(),
        sender=sender,
        sent_at=sent_at,
        body=body,
    )


def encode(env: Envelope) -> bytes:
    tail: list[bytes | memoryview] = []
    body = _move_out_of_line(env.body.model_dump(), tail)
    frame = [env.schema_version, env.kind.value, env.message_id, env.sender, env.sent_at, body]
    document = _pack(frame)
    if not tail:
        return document
    parts: list[bytes | memoryview] = [document]
    position = len(document)
    for data in tail:
        padding = -position % OUT_OF_LINE_ALIGN
        parts += [bytes(padding), data]
        position += padding + memoryview(data).nbytes
    return b"".join(parts)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Decode and validate an envelope; raise a ProtocolError subclass saying what is wrong.

    The body's large byte strings are read-only views of ``data``, which they keep alive.
    """
    frame = _unpack_envelope(data, max_bytes)
    if not isinstance(frame, list) or len(frame) != 6:
        raise DecodeError("envelope is not a 6-element array")
    schema, kind_name, message_id, sender, sent_at, body = frame
    if schema != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {schema!r} (we speak {SCHEMA_VERSION})")
    try:
        kind = Kind(kind_name)
    except ValueError:
        raise SchemaError(f"unknown message kind {kind_name!r}") from None
    if not isinstance(body, dict):
        raise DecodeError(f"{kind} body is not a map")
    try:
        typed = BODY_TYPES[kind].model_validate(body)
        return Envelope(
            schema_version=schema,
            kind=kind,
            message_id=message_id,
            sender=sender,
            sent_at=sent_at,
            body=typed,
        )
    except ValidationError as exc:
        raise DecodeError(f"invalid {kind} message: {_first_error(exc)}") from exc


def encode_record(record: BaseModel) -> bytes:
    """Serialise a typed model for disk (checkpoints, outbox); same safety as the wire."""
    return _pack(record.model_dump())


def decode_record(model: type[M], data: bytes, *, max_bytes: int = 1 << 40) -> M:
    raw = _unpack(data, max_bytes)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise DecodeError(f"invalid {model.__name__} record: {_first_error(exc)}") from exc


def array_to_tensor(name: str, array: NDArray[Any]) -> TensorPayload:
    dtype = np.dtype(array.dtype).newbyteorder("<")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return TensorPayload(name=name, dtype=dtype.name, shape=tuple(array.shape), data=data)


def tensor_to_array(tensor: TensorPayload) -> NDArray[Any]:
    """A read-only view of the tensor's bytes; its size was validated with the payload."""
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


def encode_tensors(params: Mapping[str, NDArray[Any]]) -> bytes:
    """The model blob: an ordered list of tensors."""
    return _pack([array_to_tensor(name, value).model_dump() for name, value in params.items()])


def decode_tensors(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, NDArray[Any]]:
    raw = _unpack(data, max_bytes)
    if not isinstance(raw, list):
        raise DecodeError("tensor blob is not an array")
    out: dict[str, NDArray[Any]] = {}
    for item in raw:
        try:
            tensor = TensorPayload.model_validate(item)
        except ValidationError as exc:
            raise DecodeError(f"invalid tensor in blob: {_first_error(exc)}") from exc
        if tensor.name in out:
            raise DecodeError(f"tensor {tensor.name!r} appears twice in blob")
        out[tensor.name] = tensor_to_array(tensor)
    return out


class _OutOfLine:
    """A reference, while decoding, to the next byte string after the document."""

    __slots__ = ("length", "view")

    def __init__(self, length: int) -> None:
        self.length = length
        self.view = memoryview(b"")


def _move_out_of_line(obj: object, tail: list[bytes | memoryview]) -> object:
    """``obj`` with each long byte string replaced by a reference, the string appended to tail."""
    if isinstance(obj, bytes | memoryview):
        length = memoryview(obj).nbytes
        if length < OUT_OF_LINE_BYTES:
            return obj
        tail.append(obj)
        return msgpack.ExtType(_OUT_OF_LINE_EXT, _LENGTH.pack(length))
    if isinstance(obj, dict):
        return {key: _move_out_of_line(value, tail) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_move_out_of_line(value, tail) for value in obj]
    return obj


def _unpack_envelope(data: bytes, max_bytes: int) -> object:
    """The msgpack document at the start of ``data``, its references resolved into views."""
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not isinstance(data, bytes):  # views of a mutable buffer could change under the body
        data = bytes(data)
    frame, end, references = _read_document(data)
    after = len(data) - end
    if not references:
        if after:
            raise DecodeError(f"not a msgpack document: extra data ({after} bytes after it)")
        return frame
    _place_out_of_line(data, end, references)
    try:
        return _resolve(frame)
    except RecursionError as exc:
        raise DecodeError("not a healthNET message: msgpack nesting is too deep") from exc


def _read_document(data: bytes) -> tuple[object, int, list[_OutOfLine]]:
    """The document at the start of ``data``, where it ends, and its out-of-line references."""
    references: list[_OutOfLine] = []

    def ext_hook(code: int, payload: bytes) -> _OutOfLine:
        if code != _OUT_OF_LINE_EXT or len(payload) != _LENGTH.size:
            raise DecodeError(f"unknown msgpack ext type {code} ({len(payload)} bytes)")
        references.append(_OutOfLine(_LENGTH.unpack(payload)[0]))
        return references[-1]

    limit = max(len(data), 1)
    unpacker = msgpack.Unpacker(
        io.BytesIO(data),  # shares data's buffer; the unpacker copies only what it reads
        read_size=min(_READ_SIZE, limit),
        max_buffer_size=limit,
        raw=False,
        strict_map_key=True,
        ext_hook=ext_hook,
        max_str_len=_MAX_STR,
        max_bin_len=limit,
        max_array_len=_MAX_ARRAY,
        max_map_len=_MAX_MAP,
        max_ext_len=_LENGTH.size,
    )
    try:
        frame = unpacker.unpack()
    except msgpack.OutOfData:
        raise DecodeError("not a msgpack document: it is truncated") from None
    except (msgpack.StackError, RecursionError) as exc:
        raise DecodeError("not a healthNET message: msgpack nesting is too deep") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not a msgpack document: {type(exc).__name__} {exc}".rstrip()) from exc
    return frame, unpacker.tell(), references


def _place_out_of_line(data: bytes, end: int, references: list[_OutOfLine]) -> None:
    """Point each reference at its byte string after the document's ``end``, checking that the
    strings and their zero padding fill the rest of ``data`` exactly."""
    position = end
    for reference in references:  # lengths are at most 2**64 - 1: no overflow in Python ints
        position += -position % OUT_OF_LINE_ALIGN + reference.length
    if position != len(data):
        raise DecodeError(
            f"{len(references)} out-of-line byte strings need {position - end} bytes after the "
            f"document; {len(data) - end} follow it"
        )
    view = memoryview(data).toreadonly()
    position = end
    for reference in references:
        padding = -position % OUT_OF_LINE_ALIGN
        if view[position : position + padding] != _ZEROS[:padding]:
            raise DecodeError(f"non-zero padding before out-of-line byte string at {position}")
        position += padding
        reference.view = view[position : position + reference.length]
        position += reference.length


def _resolve(obj: object) -> object:
    """``obj`` with every reference replaced by its view of the message."""
    if isinstance(obj, _OutOfLine):
        return obj.view
    # Only containers are descended into: a tensor's metadata is mostly numbers and strings,
    # and a call for each of them cost more than the rest of decoding a large update.
    if isinstance(obj, dict):
        return {
            key: _resolve(value) if type(value) in _RESOLVED else value
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [_resolve(value) if type(value) in _RESOLVED else value for value in obj]
    return obj


# What msgpack decodes that may hold a reference, or be one.
_RESOLVED = frozenset({dict, list, _OutOfLine})


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _unpack(data: bytes, max_bytes: int) -> object:
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=_MAX_STR,
            max_bin_len=max(len(data), 1),
            max_array_len=_MAX_ARRAY,
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except (msgpack.StackError, RecursionError) as exc:
        raise DecodeError("not a healthNET message: msgpack nesting is too deep") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not a msgpack document: {type(exc).__name__} {exc}".rstrip()) from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"
