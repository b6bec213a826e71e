"""The one place JSON is encoded and decoded (orjson), and where validation errors become InvalidMessage."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.errors import InvalidMessage

M = TypeVar("M", bound=BaseModel)

# OPT_SERIALIZE_NUMPY lets stages hand over numpy scalars without converting them one by one.
_OPTS = orjson.OPT_SERIALIZE_NUMPY


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    """Encode plain Python data (dicts, lists, numbers) to JSON bytes."""
    return orjson.dumps(obj, option=_OPTS | (orjson.OPT_SORT_KEYS if sort_keys else 0))


def loads(raw: bytes | str | None) -> Any:
    """Decode JSON bytes; malformed JSON, or no value at all (a tombstone), raises InvalidMessage."""
    if not raw:
        raise InvalidMessage("message has no value (null or empty)", field=None, reason="malformed_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"malformed JSON: {exc}", field=None, reason="malformed_json") from exc


def encode(msg: BaseModel, *, exclude_none: bool = False) -> bytes:
    """Encode a model to JSON bytes."""
    return orjson.dumps(msg.model_dump(mode="json", exclude_none=exclude_none), option=_OPTS)


def validation_error(model: type[BaseModel], exc: ValidationError) -> InvalidMessage:
    """Turn pydantic's error list into one InvalidMessage naming the first bad field and why."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "<root>"
    reason = err["msg"]
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return InvalidMessage(f"{model.__name__}.{field}: {reason}{more}", field=field, reason=err["type"])


def validate(model: type[M], data: Any, *, context: dict[str, Any] | None = None) -> M:
    """Validate already-decoded data into `model`, raising InvalidMessage."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise validation_error(model, exc) from exc


def decode(model: type[M], raw: bytes | str | None, *, context: dict[str, Any] | None = None) -> M:
    """Decode JSON bytes into `model`, raising InvalidMessage for malformed JSON or invalid fields."""
    return validate(model, loads(raw), context=context)
