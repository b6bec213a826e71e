"""detectors/windows.py: merging partials from several partitions and the classifier features."""

from __future__ import annotations

import pytest

from detectors.windows import FEATURE_NAMES, merge_partials
from pipeline.ingest import synth
from pipeline.ingest.stage import IngestCore, SourceMessage
from schemas.windows import WindowAggregate

T0 = 1_767_225_600.0
NOW = T0 + 10_000


def partials(specs: list[synth.WorkloadSpec], interval: float = 5.0, partitions: int = 2, seed: int = 0,
             duration: float = 60.0) -> list[WindowAggregate]:
    """One window of the workloads, nodes spread over `partitions` as Kafka keyed by node would."""
    rows = synth.samples(specs, T0, duration, interval, seed=seed)
    core = IngestCore()
    for part in range(partitions):
        mine = [r for r in rows if int(r["node"].rsplit("-", 1)[1]) % partitions == part]
        core.process("t", part, [SourceMessage(i, v) for i, (_, v) in enumerate(synth.native(mine))], NOW)
    return core.drain()


def merged(spec: synth.WorkloadSpec, **kw) -> dict:
    ps = [p for p in partials([spec], **kw) if p.window_start == T0]
    return merge_partials(ps).features


def test_merge_adds_partitions_and_dedups_window_ids() -> None:
    ps = [p for p in partials([synth.WorkloadSpec("wl", nodes=4)]) if p.window_start == T0]
    assert {p.partition for p in ps} == {0, 1}
    ww = merge_partials(ps + ps[:1])  # a redelivered partial counts once
    assert ww.device_count == 16 and ww.node_count == 4
    assert ww.flop == pytest.approx(sum(p.flop for p in ps))
    assert ww.accelerators == {"NVIDIA H100 80GB HBM3": 16}
    assert list(ww.features) == list(FEATURE_NAMES)
    assert ww.features["device_count"] == 16 and ww.features["devices_per_node"] == 4
    with pytest.raises(ValueError):
        merge_partials([])


def test_synchrony_is_near_one_for_lockstep_devices_and_near_one_over_n_for_independent_ones() -> None:
    sync = merged(synth.WorkloadSpec("wl", nodes=4, gpus_per_node=4, synchronous=True))
    indep = merged(synth.WorkloadSpec("wl", nodes=4, gpus_per_node=4, synchronous=False))
    assert sync["sync_devices_tensor"] == pytest.approx(1.0, abs=0.05)
    assert sync["sync_nodes_tensor"] == pytest.approx(1.0, abs=0.05)
    assert indep["sync_devices_tensor"] < 0.25  # ~1/16
    assert indep["sync_nodes_tensor"] < 0.6  # ~1/4
    assert sync["sync_devices_power"] == pytest.approx(1.0, abs=0.05)


def test_synchrony_of_a_lone_device_or_node_is_missing_not_lockstep() -> None:
    one = merged(synth.WorkloadSpec("wl", nodes=1, gpus_per_node=1, synchronous=False))
    node = merged(synth.WorkloadSpec("wl", nodes=1, gpus_per_node=4, synchronous=False))
    for name in ("tensor", "util", "power"):
        assert one[f"sync_devices_{name}"] is None and one[f"sync_nodes_{name}"] is None, name
        assert node[f"sync_nodes_{name}"] is None and node[f"sync_devices_{name}"] is not None, name
    assert node["sync_devices_tensor"] < 0.5  # four independent devices: ~1/4


def test_smi_only_input_gives_none_for_tensor_features_not_zero() -> None:
    f = merged(synth.WorkloadSpec("wl", smi_only=True))
    for name in ("mean_tensor", "std_tensor", "sync_devices_tensor", "sync_nodes_tensor", "profile_cv_tensor",
                 "profile_ac1_tensor", "mean_sm", "nvlink_bps", "fp64_share"):
        assert f[name] is None, name
    assert f["mean_gpu_util"] is not None and f["sync_devices_util"] is not None
    assert f["log10_flop_rate"] is not None and f["tensor_basis_share"] == 0.0
    assert 0 < f["fields_present"] < 0.5


def test_features_do_not_depend_on_the_sampling_interval() -> None:
    spec = synth.WorkloadSpec("wl", nodes=2, gpus_per_node=2, synchronous=True)
    a = merged(spec, interval=1.0)
    b = merged(spec, interval=5.0, seed=0)
    for name in ("mean_tensor", "mean_power", "mean_gpu_util", "nvlink_bps", "mean_fb_used", "device_count"):
        assert a[name] == pytest.approx(b[name], rel=0.05), name
    assert a["log10_flop_rate"] == pytest.approx(b["log10_flop_rate"], abs=0.03)
    assert a["sync_devices_tensor"] == pytest.approx(b["sync_devices_tensor"], abs=0.1)


def test_corrections_merge_into_the_same_window() -> None:
    rows = synth.samples([synth.WorkloadSpec("wl")], T0, 240, 5.0)
    vals = [v for _, v in synth.native(rows)]
    late, rest = vals[:16], vals[16:]
    core = IngestCore()
    out = []
    for i in range(0, len(rest), 40):
        core.process("t", 0, [SourceMessage(i + j, v) for j, v in enumerate(rest[i : i + 40])], NOW)
        out += core.ready()
    core.process("t", 0, [SourceMessage(10_000 + j, v) for j, v in enumerate(late)], NOW)
    out += core.drain()
    first = [p for p in out if p.window_start == T0]
    assert sorted(p.revision for p in first)[0] == 0 and max(p.revision for p in first) > 0
    ww = merge_partials(first)
    assert ww.sample_count == 8 * 12 and ww.device_seconds == pytest.approx(8 * 60)


def _hand_window(sums: dict[str, float]) -> WindowAggregate:
    return WindowAggregate(window_id="w-0", workload_id="wl", window_start=T0, window_end=T0 + 60.0, sample_count=6,
                           device_count=1, node_count=1, devices=["GPU-0"], nodes=["n-0"], device_seconds=60.0,
                           flop=0.0, flop_low=0.0, flop_high=0.0, basis="utilisation_power", sums=sums)


def _weighted(name: str, values: list[float], interval: float) -> dict[str, float]:
    """The additive sums ingest sends for one metric: time-weighted sum, sum of squares, seconds, sample count."""
    return {f"{name}.sum": sum(v * interval for v in values), f"{name}.sumsq": sum(v * v * interval for v in values),
            f"{name}.n": interval * len(values), f"{name}.count": float(len(values))}


def test_mem_copy_util_is_a_fraction_like_the_other_utilisations() -> None:
    # DCGM's MEM_COPY_UTIL and nvidia-smi's utilisation arrive in percent; gpu_util is already a fraction
    # (ingest derives util_frac), mem_copy_util must become one where the feature is computed.
    copy_pct = [20.0, 40.0, 60.0, 20.0, 40.0, 60.0]
    util_frac = [0.5, 0.7, 0.9, 0.5, 0.7, 0.9]
    ww = merge_partials([_hand_window({**_weighted("mem_copy_util", copy_pct, 10.0),
                                       **_weighted("util_frac", util_frac, 10.0), "samples": 6.0})])
    f = ww.features
    assert f["mean_mem_copy_util"] == pytest.approx(0.40)
    assert f["std_mem_copy_util"] == pytest.approx(0.163299, rel=1e-4)  # population std of 0.2/0.4/0.6
    assert f["mean_gpu_util"] == pytest.approx(0.70)
    assert 0.0 <= f["mean_mem_copy_util"] <= 1.0 and f["std_tensor"] is None  # absent stays None, never 0
