"""Encoding of job arguments and results.

JSON is the default because decoding it cannot run code: anyone who can write
to the store can plant a payload, and a pickle payload would execute in every
worker that decodes it. Pickle is available per App for trusted callers only.
"""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any

from makeway.errors import PayloadError, UsageError

logger = logging.getLogger(__name__)

JSON = "json"
PICKLE = "pickle"
SERIALIZERS = (JSON, PICKLE)


def _find_unencodable(value: Any, path: str) -> str | None:
    """Return the path of the first value inside `value` that JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if value == value and value not in (float("inf"), float("-inf")) else path
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_unencodable(item, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} key {key!r}"
            found = _find_unencodable(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    return path


def encode(value: Any, serializer: str, *, what: str, limit_bytes: int) -> bytes:
    """Encode `value` (arguments or a result) and enforce the payload limit.

    Raises PayloadError naming the offending part of `what`.
    """
    if serializer == JSON:
        try:
            bad_path = _find_unencodable(value, what)
        except RecursionError:
            raise PayloadError(
                f"{what} nests too deeply or contains itself, so it cannot be encoded as JSON; pass a flat copy"
            ) from None
        if bad_path is not None:
            raise PayloadError(
                f"{bad_path} cannot be encoded as JSON. Pass str, int, float, bool, None, "
                "list or dict values (convert bytes, datetimes and objects first), "
                "or create the App with serializer='pickle' for trusted callers."
            )
        data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    elif serializer == PICKLE:
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise PayloadError(f"{what} cannot be pickled: {exc}") from exc
    else:
        raise UsageError(f"serializer {serializer!r} is unknown; use one of {SERIALIZERS}")

    if len(data) > limit_bytes:
        raise PayloadError(
            f"{what} encodes to {len(data)} bytes, over the payload limit of {limit_bytes} bytes. "
            "Store large data elsewhere and pass a reference, or raise payload_limit_bytes."
        )
    return data


def decode(data: bytes, serializer: str, *, allow_pickle: bool) -> Any:
    """Decode a payload from the store.

    A pickle payload is decoded only where the App opted in, so a row planted in
    the store cannot make a default node run code.
    """
    if serializer == JSON:
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"invalid payload: not valid JSON ({exc})") from exc
    if serializer == PICKLE:
        if not allow_pickle:
            raise PayloadError(
                "invalid payload: it is pickled, and this App does not accept pickle. "
                "Create the App with serializer='pickle' only if every writer to the store is trusted."
            )
        return pickle.loads(data)
    raise PayloadError(f"invalid payload: serializer {serializer!r} is unknown")
