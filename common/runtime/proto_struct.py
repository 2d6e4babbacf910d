"""The one conversion between protobuf well-known types (Struct, Timestamp) and plain values.

Struct stores every number as a double, so a config's `vocab_size: 32000` comes back as 32000.0;
`struct_to_dict` gives integral values back as int (only below 2**53, where a double is exact, so a
large float is never silently turned into a wrong int). `dict_to_struct` turns a value Struct cannot
hold into InvalidArgument naming the field, instead of a bare ValueError deep in a handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.json_format import MessageToDict

from tokenmill.common.errors import InvalidArgument

_EXACT = 2**53  # doubles represent every integer below this exactly


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict, integral numbers back as int."""
    return _ints(MessageToDict(s)) if s.fields else {}


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
