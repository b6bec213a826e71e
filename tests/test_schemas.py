"""Schema round trips and rejection of bad input with messages that name the field and the reason."""

from __future__ import annotations

import json

import pytest

from schemas import MESSAGE_TYPES, AllocationEvent, CipRecord, InvalidMessage, TelemetrySample, WindowAggregate
from schemas.case import Case, CaseEvent
from schemas.cip import BeneficialOwner, IpAccess, Reseller
from schemas.detection import Detection
from schemas.export import export_json_schemas
from schemas.serde import decode, encode, validate
from schemas.telemetry import TelemetryBatch, TelemetryColumns

NOW = 1_780_000_000.0


def _sample(**kw) -> dict:
    base = {"ts": NOW, "node": "node-1", "device": "GPU-aaaa", "accelerator": "NVIDIA H100 80GB HBM3"}
    return base | kw


EXAMPLES = [
    TelemetrySample(**_sample(tensor_active=0.5, gpu_util=93.0, power_w=512.5, fb_used_mib=70_000, precision="bf16")),
    TelemetryBatch(node="node-1", samples=[TelemetrySample(**_sample()), TelemetrySample(**_sample(device="GPU-b"))]),
    TelemetryColumns(node="node-1", ts=[NOW, NOW + 1], device=["GPU-a", "GPU-a"], metrics={"gpu_util": [50.0, None]}),
    AllocationEvent(event_id="e1", ts=NOW, kind="reserved", account_id="acct-1", accelerator="H100", count=64,
                    reserved_until=NOW + 86_400, region="us-east", interconnect_gbps=400),
    CipRecord(account_id="acct-1", updated_at=NOW, customer_name="Example Ltd", customer_type="entity", country="SG",
              us_person=False, beneficial_owners=[BeneficialOwner(owner_id="bo-1", name="A. Person", ownership_pct=30,
                                                                  nationality="SG", residence="SG")],
              reseller=Reseller(name="Resell Pte", country="SG"), emails=["ops@example.sg"], phones=["+65 1234"],
              ip_addresses=[IpAccess(ip="203.0.113.7", accessed_at=NOW)], verification_status="verified",
              verified_at=NOW, special_measures=["watch"]),
    WindowAggregate(window_id="w-1", workload_id="wl-1", account_id="acct-1", window_start=NOW, window_end=NOW + 60,
                    sample_count=8, device_count=8, node_count=1, device_seconds=480, flop=1e17, flop_low=1e17,
                    flop_high=2e17, basis="tensor_active", features={"tensor_active.mean": 0.4, "nvlink": None}),
    Detection(detection_id="d-1", detector_id="compute_threshold", detector_version=1, severity="high",
              policy_id="demo", policy_version="1.0.0", outcome="reportable", reason="compute_used",
              account_id="acct-1", event_time=NOW, evidence={"flop": 1.2e18}),
    Case(case_id="c-1", account_id="acct-1", policy_id="demo", policy_version="1.0.0", reason="compute_used",
         status="open", knowledge_at=NOW, detected_at=NOW + 5, due_at=NOW + 15 * 86_400, updated_at=NOW + 5),
    CaseEvent(event_id="ce-1", case_id="c-1", at=NOW, recorded_at=NOW + 5, actor="pipeline", action="opened",
              to_status="open"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    again = decode(type(msg), encode(msg), context={"now": NOW})
    assert again == msg
    assert again.schema_version == 1


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ({"tensor_active": 1.5}, "tensor_active", "less than or equal to 1"),
        ({"sm_active": -0.1}, "sm_active", "greater than or equal to 0"),
        ({"gpu_util": "lots"}, "gpu_util", "valid number"),
        ({"pcie_tx_bytes": -5}, "pcie_tx_bytes", "greater than or equal to 0"),
        ({"energy_mj": -1}, "energy_mj", "greater than or equal to 0"),
        ({"ts": NOW + 10 * 86_400}, "ts", "ahead of"),
        ({"ts": 12.0}, "ts", "before 2000"),
        ({"node": ""}, "node", "at least 1 character"),
        ({"bogus_field": 1}, "bogus_field", "Extra inputs"),
    ],
)
def test_bad_telemetry_is_rejected_with_field_and_reason(patch, field, words):
    raw = json.dumps(_sample(**patch)).encode()
    with pytest.raises(InvalidMessage) as info:
        decode(TelemetrySample, raw, context={"now": NOW})
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


def test_missing_required_field_and_malformed_json():
    with pytest.raises(InvalidMessage, match=r"TelemetrySample\.device: Field required"):
        decode(TelemetrySample, json.dumps({"ts": NOW, "node": "n"}), context={"now": NOW})
    with pytest.raises(InvalidMessage, match="malformed JSON") as info:
        decode(TelemetrySample, b'{"ts": 1', context={"now": NOW})
    assert info.value.reason == "malformed_json"


def test_missing_metrics_stay_missing_and_sentinels_become_missing():
    s = decode(TelemetrySample, json.dumps(_sample(power_w=2147483632, pcie_rx_bytes=9223372036854775794,
                                                    gpu_util=140737488355328.0, fb_used_mib=0)),
               context={"now": NOW})
    assert s.power_w is None and s.pcie_rx_bytes is None and s.gpu_util is None
    assert s.tensor_active is None  # never reported: unknown, not zero
    assert s.fb_used_mib == 0  # a real zero stays a zero


def test_byte_counters_above_int32_are_not_sentinels():
    s = decode(TelemetrySample, json.dumps(_sample(nvlink_tx_bytes=2_147_483_640)), context={"now": NOW})
    assert s.nvlink_tx_bytes == 2_147_483_640


def test_unknown_accelerator_model_is_kept():
    from detectors.catalog import resolve

    s = decode(TelemetrySample, json.dumps(_sample(accelerator="Acme Tensorblaster 9000")), context={"now": NOW})
    assert s.accelerator == "Acme Tensorblaster 9000"
    assert resolve(s.accelerator) is None


def test_columns_must_line_up():
    with pytest.raises(InvalidMessage, match="metric gpu_util has 1 entries, ts has 2"):
        decode(TelemetryColumns, json.dumps({"node": "n", "ts": [NOW, NOW], "device": ["a", "b"],
                                             "metrics": {"gpu_util": [1.0]}}))
    with pytest.raises(InvalidMessage, match="unknown metric 'warp_drive'"):
        decode(TelemetryColumns, json.dumps({"node": "n", "ts": [NOW], "device": ["a"],
                                             "metrics": {"warp_drive": [1.0]}}))


def test_reservation_cannot_end_before_it_starts():
    with pytest.raises(InvalidMessage, match="reserved_until"):
        decode(AllocationEvent, json.dumps({"event_id": "e", "ts": NOW, "kind": "reserved", "account_id": "a",
                                            "count": 8, "reserved_until": NOW - 1}))


def test_cip_ownership_percentage_bounded():
    with pytest.raises(InvalidMessage, match="ownership_pct"):
        decode(CipRecord, json.dumps({"account_id": "a", "updated_at": NOW,
                                      "beneficial_owners": [{"owner_id": "o", "name": "x", "ownership_pct": 140}]}))


def test_json_schema_export_writes_one_file_per_type(tmp_path):
    paths = export_json_schemas(tmp_path)
    assert len(paths) == len(MESSAGE_TYPES)
    for p in paths:
        schema = json.loads(p.read_text())
        assert schema["$id"].startswith("trainwatch/")
        assert "properties" in schema
    sample_schema = json.loads((tmp_path / "telemetry_sample.v1.schema.json").read_text())
    assert sample_schema["properties"]["tensor_active"]["anyOf"][0]["maximum"] == 1


@pytest.mark.parametrize("model,data,field", [
    (CipRecord, {"account_id": "a", "updated_at": 1e300}, "updated_at"),
    (CipRecord, {"account_id": "a", "updated_at": 1_767_225_600.0, "verified_at": -5.0}, "verified_at"),
    (AllocationEvent, {"event_id": "e", "ts": 1_767_225_600.0, "kind": "reserved", "account_id": "a", "count": 8,
                       "reserved_until": 1e300}, "reserved_until"),
    (Detection, {"detection_id": "d", "detector_id": "x", "detector_version": 1, "severity": "high",
                 "policy_id": "demo", "policy_version": "1", "outcome": "reportable", "reason": "compute_used",
                 "account_id": "a", "event_time": 1e300}, "event_time"),
])
def test_times_outside_2000_to_9999_are_refused(model, data, field) -> None:
    # 1e300 s once reached the store, overflowed its microsecond version column and stopped the pipeline; a
    # detection's time becomes a case's knowledge and due times, which the store's views turn into DateTime64.
    with pytest.raises(InvalidMessage, match=field):
        validate(model, data)


def _partial_sums(scale: float) -> dict[str, float]:
    """A partial's sums from accumulators: two statistics carried, two buckets of one synchrony profile."""
    from schemas.window_sums import BASES, STAT_FIELDS, SYNC_FIELDS, write_sums

    stats = [[0.0] * len(STAT_FIELDS) for _ in range(4)]
    for name, v in (("power_w", 300.0), ("tensor_active", 0.5)):
        j = STAT_FIELDS.index(name)
        stats[0][j], stats[1][j], stats[2][j], stats[3][j] = v * 10 * scale, v * v * 10 * scale, 10 * scale, scale
    prof_sum = [[0.0] * 12 for _ in SYNC_FIELDS]
    prof_n = [[0.0] * 12 for _ in SYNC_FIELDS]
    prof_sum[0][0], prof_n[0][0], prof_sum[0][5], prof_n[0][5] = 0.4 * scale, scale, 0.6 * scale, scale
    spread = [[0.01 * scale, scale, 0.02 * scale, scale] for _ in SYNC_FIELDS]
    basis = [0.0] * len(BASES)
    basis[BASES.index("tensor_active")] = scale
    return write_sums(scale, stats, basis, prof_sum, prof_n, spread)


def test_window_sums_written_and_read_by_one_layout() -> None:
    from schemas.window_sums import read_sums

    sums = _partial_sums(1.0)
    assert sums["power_w.sum"] == 3000.0 and "gpu_util.sum" not in sums  # absent fields are not written
    assert "prof.util_frac.0.sum" not in sums and "util_frac.dev_var.n" not in sums  # nor empty profiles
    ws = read_sums({**sums, "not.a.key": 5.0, "prof.tensor_active.x.sum": 1.0})  # foreign keys are ignored
    assert ws.samples == 1.0
    assert ws.stat("power_w").sum / ws.stat("power_w").seconds == 300.0
    assert ws.stat("gpu_util").count == 0.0
    assert ws.basis == {"none": 0.0, "utilisation_power": 0.0, "tensor_active": 1.0, "unknown_accelerator": 0.0}
    assert ws.interval_unknown == 0.0
    assert ws.profiles["tensor_active"] == [0.4, 0.6] and ws.profiles["util_frac"] == []
    assert ws.spread[("tensor_active", "node")] == (0.02, 1.0)


def test_window_sums_merge_by_adding_key_by_key() -> None:
    """Partials of one window (partitions, corrections) merge by adding their sums; read-back equals the sum."""
    from schemas.window_sums import read_sums

    a, b = _partial_sums(1.0), _partial_sums(2.0)
    merged = {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}
    ws, wa, wb = read_sums(merged), read_sums(a), read_sums(b)
    assert ws.samples == 3.0
    assert ws.stat("power_w") == tuple(x + y for x, y in zip(wa.stat("power_w"), wb.stat("power_w"), strict=True))
    assert ws.profiles["tensor_active"] == pytest.approx([0.4, 0.6])


def test_window_sums_profile_buckets_are_bounded() -> None:
    from schemas.window_sums import MAX_PROFILE_BUCKETS, profile_keys

    assert profile_keys(12)[0][11] == ("prof.tensor_active.11.sum", "prof.tensor_active.11.n")
    with pytest.raises(ValueError, match="profile buckets"):
        profile_keys(MAX_PROFILE_BUCKETS + 1)
