"""The one wire format: msgpack envelopes, typed bodies, and tensors as (name, dtype, shape, bytes).

This is the only module that calls msgpack. Decoding is defensive: sizes and nesting are capped
before anything is allocated, unknown schema versions and kinds are refused, and tensor bytes are
checked against their declared dtype and shape before ``numpy.frombuffer`` sees them. Nothing is
ever unpickled.
"""

from __future__ import annotations

import hashlib
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
    frame = [
        env.schema_version,
        env.kind.value,
        env.message_id,
        env.sender,
        env.sent_at,
        env.body.model_dump(),
    ]
    return _pack(frame)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Decode and validate an envelope; raise a ProtocolError subclass saying what is wrong."""
    frame = _unpack(data, max_bytes)
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
