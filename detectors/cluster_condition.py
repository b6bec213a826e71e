"""The computing-cluster condition: accelerators an account holds at once, in one datacenter, whose theoretical
peak reaches `cluster_ops_per_s`, networked faster than `cluster_network_gbps` (EO 14110 s4.2(b)).

Peak is the catalog's BF16 dense figure (no sparsity), as for reservations; FP8 is shown beside it. An unknown
interconnect does not meet the condition (it is reported as unknown, never assumed).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from detectors.base import DetectContext, Detector
from detectors.catalog import resolve
from schemas.allocation import AllocationEvent
from schemas.detection import Detection


def cluster_figures(held: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per datacenter: devices, BF16 and FP8 peak FLOP/s, slowest known interconnect, and unknown models."""
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"devices": 0, "peak_bf16": 0.0, "peak_fp8": 0.0,
                                                          "min_gbps": None, "unknown_network": 0, "unknown": []})
    for h in held.values():
        f = out[h.get("datacenter") or "?"]
        acc = resolve(h.get("accelerator"))
        count = int(h.get("count") or 0)
        f["devices"] += count
        if acc is None or "bf16" not in acc.peak_flops:
            f["unknown"].append(h.get("accelerator"))
            continue
        f["peak_bf16"] += count * acc.peak_flops["bf16"]
        f["peak_fp8"] += count * acc.peak_flops.get("fp8", acc.peak_flops["bf16"])
        g = h.get("interconnect_gbps")
        if g is None:
            f["unknown_network"] += count
        else:
            f["min_gbps"] = g if f["min_gbps"] is None else min(f["min_gbps"], g)
    return dict(out)


class ClusterCondition(Detector):
    id = "cluster_condition"
    version = 1
    severity = "medium"
    maturity = "experimental"
    description = "An account holds, in one datacenter, accelerators meeting the computing-cluster condition."

    def detect(self, state: DetectContext, event: Any) -> list[Detection]:
        t = state.policy.thresholds
        if not isinstance(event, AllocationEvent) or state.account is None or t.cluster_ops_per_s is None:
            return []
        net = t.cluster_network_gbps or 0.0
        for dc, f in sorted(cluster_figures(state.account.held).items()):
            networked = f["min_gbps"] is not None and f["min_gbps"] > net and f["unknown_network"] == 0
            if f["peak_bf16"] >= t.cluster_ops_per_s and networked:
                evidence = {"datacenter": dc, **f, "cluster_ops_per_s": t.cluster_ops_per_s,
                            "cluster_network_gbps": t.cluster_network_gbps, "held": dict(state.account.held),
                            "allocation_event_id": event.event_id}
                summary = (f"account {state.account_id} holds {f['devices']} accelerators in {dc}: "
                           f"{f['peak_bf16']:.3g} OP/s peak >= {t.cluster_ops_per_s:.3g}, network {f['min_gbps']} "
                           f"Gbit/s > {net}")
                return [self.detection(state, outcome="info", reason="cluster_condition", event_time=event.ts,
                                       summary=summary, evidence=evidence)]
        return []
