"""JSON in and out the way Mosquitto's plugin sees it (cJSON), spec/dynsec.md §3.3.

Mosquitto parses requests and its file with cJSON, which gives these
observable rules that every handler relies on; this module applies them once
so the handlers can use plain dict lookups:

- object keys are looked up case-insensitively, the first of several equal
  keys wins: keys are lower-cased here, first occurrence kept;
- strings are C strings: anything after an embedded NUL is lost;
- numbers are read as C ints (``valueint``): truncated toward zero and
  saturated to the int32 range;
- ``NaN``/``Infinity`` are not JSON; text after the first JSON value is ignored.

Invalid UTF-8 inside a string (raw bytes or a lone ``\\udXXX`` escape) cannot be
kept in a Python str that must be serialised again (the change goes into the
Raft log), so such code points become U+FFFF, which :func:`valid_utf8` rejects
exactly like Mosquitto rejects the original ("... not valid UTF-8").
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


class PayloadError(ValueError):
    """The payload is not JSON."""


def _reject_constant(name: str) -> Any:
    raise PayloadError(name)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(_clean_str(key).lower(), value)
    return out


def _clean_str(s: str) -> str:
    s = s.split("\0", 1)[0]
    if any("\ud800" <= ch <= "\udfff" for ch in s):
        s = "".join("\uffff" if "\ud800" <= ch <= "\udfff" else ch for ch in s)
    return s


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return min(max(value, INT_MIN), INT_MAX)
    if isinstance(value, float):
        if math.isnan(value):
            return 0
        if math.isinf(value):
            return INT_MAX if value > 0 else INT_MIN
        return min(max(int(value), INT_MIN), INT_MAX)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


_decoder = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_reject_constant)


def parse(payload: bytes | str) -> Any:
    """Parse a request payload or a file into normalised JSON values (see module doc)."""
    text = payload.decode("utf-8", "surrogateescape") if isinstance(payload, bytes | bytearray | memoryview) else payload
    text = text.lstrip(" \t\r\n")
    try:
        value, _end = _decoder.raw_decode(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError(str(exc)) from None
    return _clean(value)


def normalize(value: Any) -> Any:
    """Normalise an already-parsed JSON value (e.g. a dict given by a caller)."""
    if isinstance(value, dict):
        value = _object(list(value.items()))
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return _clean(value)


def dumps(value: Any) -> bytes:
    """Compact JSON, UTF-8, as Mosquitto sends responses (cJSON_PrintUnformatted)."""
    return orjson.dumps(value)


def valid_utf8(s: str) -> bool:
    """Mosquitto's ``mosquitto_validate_utf8`` on an already-decoded string.

    Besides well-formedness it refuses control characters (U+0001-U+001F,
    U+007F-U+009F) and the non-characters U+FDD0-U+FDEF and U+xxFFFE/U+xxFFFF.
    """
    for ch in s:
        cp = ord(ch)
        if cp <= 0x1F or 0x7F <= cp <= 0x9F:
            return False
        if 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
            return False
    return True
