"""Models -> one Arrow IPC stream, the store's fast insert format (``raw_insert(fmt="ArrowStream")``).

Why: clickhouse-connect's Native writer encodes wide rows value by value in Python; the windows table's two maps
(~160 entries a row) made it the store's bottleneck. Here pyarrow's C++ converters build each column from plain
lists and the engine reads the Arrow buffers directly. Arrow carries floats as raw IEEE doubles, so NaN, inf, -0.0
and every bit of a float arrive exactly as with Native; nulls stay nulls.

The Arrow types are derived from the live table's ClickHouse types (DESCRIBE), so they follow the migrations,
nullability included (a None where the column is not Nullable is an error, not a default). Integers go through
numpy with the column's width, which raises OverflowError for a value that does not fit rather than letting the
engine wrap it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

_SCALARS: dict[str, pa.DataType] = {
    "String": pa.string(),
    "Bool": pa.bool_(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
}


def _split_args(args: str) -> list[str]:
    """'String, Array(Int64)' -> ['String', 'Array(Int64)'] (commas at depth 0 only)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    out.append(args[start:].strip())
    return out


def arrow_type(ch_type: str) -> tuple[pa.DataType, bool]:
    """A ClickHouse column type -> (Arrow type, nullable). Only the types the store's tables use."""
    name, _, rest = ch_type.strip().partition("(")
    if not rest:
        if name not in _SCALARS:
            raise ValueError(f"no Arrow mapping for ClickHouse type {ch_type!r}")
        return _SCALARS[name], False
    args = _split_args(rest.removesuffix(")"))
    if name == "Nullable":
        return arrow_type(args[0])[0], True
    if name == "LowCardinality":
        return arrow_type(args[0])
    # Nested values carry their nullability too: the engine rejects a null where the column has no Nullable,
    # as the Native writer does, instead of storing a default ('' or 0).
    if name == "Array":
        return pa.list_(pa.field("item", *arrow_type(args[0]))), False
    if name == "Map":
        return pa.map_(arrow_type(args[0])[0], pa.field("value", *arrow_type(args[1]))), False
    raise ValueError(f"no Arrow mapping for ClickHouse type {ch_type!r}")


def _converter(t: pa.DataType, nullable: bool) -> Callable[[list], Any]:
    if pa.types.is_integer(t) and not nullable:
        # numpy checks the range; pyarrow's own conversion of Python ints to uint8 is ~100x slower.
        return partial(np.array, dtype=t.to_pandas_dtype())
    # Everything else, maps included, in pyarrow's C++ converter (flattening the maps by hand first measured the
    # same): the dicts' keys and values are read once, never encoded one by one in Python.
    return partial(pa.array, type=t)


class ArrowRows:
    """Encodes models whose fields are plain values (str, numbers, lists, dicts, None) for one table."""

    def __init__(self, columns: Sequence[str], ch_types: Mapping[str, str]):
        missing = [c for c in columns if c not in ch_types]
        if missing:
            raise ValueError(f"table has no column(s) {missing}")
        typed = [(c, *arrow_type(ch_types[c])) for c in columns]
        self.columns = list(columns)
        self.schema = pa.schema([pa.field(c, t, nullable) for c, t, nullable in typed])
        self._converters = [_converter(t, nullable) for _, t, nullable in typed]

    def payload(self, items: Sequence[Any]) -> bytes:
        """The items (pydantic models) as one Arrow IPC stream with a single record batch."""
        fields = [vars(i) for i in items]  # the models' own field dicts: no model_dump copy
        arrays = [conv([f[c] for f in fields]) for c, conv in zip(self.columns, self._converters, strict=True)]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as writer:
            writer.write_batch(batch)
        return sink.getvalue().to_pybytes()
