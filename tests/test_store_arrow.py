"""The windows fast path (Arrow IPC into the engine) stores exactly what clickhouse-connect's own insert stores."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from pipeline.arrow_rows import arrow_type
from pipeline.store import _WINDOWS, Store
from schemas.windows import WindowAggregate
from tests.test_store import T0, make_window

NAN, INF = math.nan, math.inf
ODD = 'quo"te \'single\' back\\slash,comma\ttab\nnewline é 日本 🚀 \x00nul'


def odd_windows() -> list[WindowAggregate]:
    plain = make_window("wl-1", "acct-1", T0)
    bare = make_window(
        "wl-2", None, T0 + 60, job_id=None, run_label=None, devices=[], nodes=[], accelerators={},
        unknown_accelerators=[], sums={}, features={}, missing_fields=[], offsets={},
    )
    odd = make_window(
        # the window's bounds: the first and last floats EpochSeconds allows (2000-01-01 and the year 10000)
        ODD, ODD, math.nextafter(946_684_800.0, INF), revision=2**32 - 1, partition=2**32 - 1, job_id="",
        run_label=ODD, window_end=math.nextafter(253_402_300_800.0, 0.0), sample_count=2**64 - 1,
        device_count=2**32 - 1, node_count=0,
        devices=[ODD, "", "GPU-0"], nodes=[ODD], device_seconds=5e-324, flop=INF, flop_low=0.0,
        flop_high=1.7976931348623157e308, accelerators={ODD: 2**32 - 1, "": 0},
        unknown_accelerators=[ODD], sums={"nan": NAN, "inf": INF, "-inf": -INF, "neg0": -0.0, ODD: 0.1 + 0.2},
        features={"none": None, "nan": NAN, "inf": INF, "neg0": -0.0, ODD: -1e-310, "": 1e300},
        missing_fields=[ODD], offsets={ODD: [-(2**63), 2**63 - 1], "t:0": [], "t:1": [0]},
    )
    return [plain, bare, odd]


def exact(windows: list[WindowAggregate]) -> list[str]:
    """NaN-safe, sign-of-zero-safe comparison form (model == model is False for NaN fields)."""
    return sorted(repr(w.model_dump()) for w in windows)


def test_odd_window_values_round_trip_exactly(store: Store) -> None:
    windows = odd_windows()
    store.insert_windows(windows)
    assert exact(store.list_windows()) == exact(windows)
    assert [repr(w.model_dump()) for w in store.list_windows(account_id=ODD)] == [repr(windows[2].model_dump())]


def test_fast_path_stores_the_same_bytes_as_the_drivers_own_insert(store: Store) -> None:
    windows = odd_windows()
    store.client.command("CREATE TABLE windows_driver AS windows")
    store.client.insert("windows_driver", [_WINDOWS.row(w) for w in windows], column_names=_WINDOWS.columns)
    store.insert_windows(windows)
    dump = "SELECT * FROM {} ORDER BY window_id FORMAT RowBinaryWithNamesAndTypes"
    assert store.client.raw_query(dump.format("windows")) == store.client.raw_query(dump.format("windows_driver"))


@pytest.mark.parametrize(
    "over", [{"device_count": 2**32}, {"sample_count": 2**64}, {"accelerators": {"H100": 2**32}}],
    ids=["uint32", "uint64", "map-uint32"],
)
def test_value_outside_the_column_type_is_an_error_and_stores_nothing(store: Store, over: dict) -> None:
    windows = [make_window("wl-1", "acct-1", T0), make_window("wl-2", "acct-1", T0, **over)]
    with pytest.raises((OverflowError, pa.ArrowInvalid)):
        store.insert_windows(windows)
    assert store.query("SELECT count() AS n FROM windows") == [{"n": 0}]


@pytest.mark.parametrize(
    "field, bad",
    [("flop", None), ("window_id", None), ("sums", {"a": None}), ("devices", [None]), ("offsets", {"t": [None]})],
)
def test_none_where_the_column_is_not_nullable_is_an_error_and_stores_nothing(
    store: Store, field: str, bad: object
) -> None:
    broken = make_window("wl-2", "acct-1", T0)
    setattr(broken, field, bad)  # models validate on construction only; a stage could still hand over such a value
    with pytest.raises(DatabaseError, match="non-nullable"):
        store.insert_windows([make_window("wl-1", "acct-1", T0), broken])
    assert store.query("SELECT count() AS n FROM windows") == [{"n": 0}]


def test_arrow_types_follow_clickhouse_types() -> None:
    nullable_f64, int64_list = pa.field("value", pa.float64(), True), pa.list_(pa.field("item", pa.int64(), False))
    assert arrow_type("Map(String, Nullable(Float64))") == (pa.map_(pa.string(), nullable_f64), False)
    map_of_lists = pa.map_(pa.string(), pa.field("value", int64_list, False))
    assert arrow_type("Map(String, Array(Int64))") == (map_of_lists, False)
    assert arrow_type("Map(String, Float64)") != arrow_type("Map(String, Nullable(Float64))")
    assert arrow_type("LowCardinality(Nullable(String))") == (pa.string(), True)
    assert arrow_type("Array(String)") == (pa.list_(pa.field("item", pa.string(), False)), False)
    assert arrow_type("UInt8") == (pa.uint8(), False)
    with pytest.raises(ValueError, match="DateTime64"):
        arrow_type("DateTime64(3, 'UTC')")
