"""The one conversion between protobuf well-known types (Struct, Timestamp) and plain values.

Struct stores every number as a double, so a config's `vocab_size: 32000` comes back as 32000.0;
`struct_to_dict` gives integral values back as int (only below 2**53, where a double is exact, so a
large float is never silently turned into a wrong int), without a JSON round trip, so NaN
survives instead of raising. `dict_to_struct` turns a value Struct cannot
hold into InvalidArgument naming the field, instead of a bare ValueError deep in a handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from tokenmill.common.errors import InvalidArgument

_EXACT = 2**53  # doubles represent every integer below this exactly


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() and abs(value) < _EXACT else value


def _plain(value: struct_pb2.Value) -> Any:
    """One Value as a plain Python value, walked directly: JSON (MessageToDict) has no NaN or
    infinity and raises on them, and a stored metric may legitimately be NaN."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return _number(value.number_value)
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict, integral numbers back as int, NaN and infinity kept as floats."""
    return {key: _plain(value) for key, value in s.fields.items()}


def dict_to_struct(d: Mapping[str, Any] | None, *, what: str = "value") -> struct_pb2.Struct:
    """A JSON-like mapping as a Struct (empty for None); `what` names the field in the error."""
    s = struct_pb2.Struct()
    if d:
        try:
            s.update(dict(d))
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidArgument(
                f"{what} must be JSON-like (str, number, bool, None, list, dict with str keys): {exc}"
            ) from None
    return s


def timestamp_from_seconds(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """Epoch seconds as a Timestamp, to the nearest nanosecond; None stays unset."""
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(round(seconds * 1e9)))
    return ts
