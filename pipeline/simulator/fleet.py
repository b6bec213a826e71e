"""The simulated fleet: nodes of 8 accelerators, in regions and datacenters, with a telemetry tier per node."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors.catalog import Accelerator, resolve
from schemas.ids import content_id

GPUS_PER_NODE = 8

#: Catalog key -> model name as the vendor's exporter reports it (DCGM modelName / amd-smi product name).
REPORTED_NAMES = {
    "H100": "NVIDIA H100 80GB HBM3",
    "H200": "NVIDIA H200",
    "B200": "NVIDIA B200",
    "A100": "NVIDIA A100-SXM4-80GB",
    "MI300X": "AMD Instinct MI300X",
    "L40S": "NVIDIA L40S",
    "L4": "NVIDIA L4",
}
#: Per-node network bandwidth (Gbit/s): training parts get 8x400G InfiniBand/RoCE, inference parts less.
INTERCONNECT_GBPS = {"H100": 3200.0, "H200": 3200.0, "B200": 3200.0, "A100": 1600.0, "MI300X": 3200.0,
                     "L40S": 400.0, "L4": 100.0}
REGIONS = {"us-east": ("use1-a", "use1-b"), "us-west": ("usw2-a",), "eu-central": ("euc1-a",)}
#: Sustained clocks (MHz) under load: (sm, mem); idle clocks are a fraction of these.
CLOCKS = {"H100": (1980, 2619), "H200": (1980, 3201), "B200": (1965, 4000), "A100": (1410, 1593),
          "MI300X": (2100, 1300), "L40S": (2520, 9001), "L4": (2040, 6251)}


@dataclass(frozen=True, slots=True)
class Node:
    index: int
    name: str
    model: str  # catalog key
    region: str
    datacenter: str
    interconnect_gbps: float
    smi_only: bool  # reports only nvidia-smi-level fields (no DCGM profiling)

    @property
    def reported_name(self) -> str:
        return REPORTED_NAMES[self.model]

    @property
    def accelerator(self) -> Accelerator:
        acc = resolve(self.reported_name)
        assert acc is not None, self.reported_name
        return acc


@dataclass
class Fleet:
    nodes: list[Node]

    def __post_init__(self) -> None:
        # Global device table: device index = node.index * 8 + gpu index.
        self.device_uuid = np.array(
            [content_id("GPU", n.name, g) for n in self.nodes for g in range(GPUS_PER_NODE)],
            dtype=object,
        )
        self.node_name = np.array([n.name for n in self.nodes], dtype=object)
        self.smi_only = np.array([n.smi_only for n in self.nodes], dtype=bool)
        self._free: dict[str, list[int]] = {}
        self._busy: dict[int, list[tuple[float, float]]] = {}
        for n in self.nodes:
            self._free.setdefault(n.model, []).append(n.index)

    def free_count(self, model: str, start: float, end: float, smi_only: bool) -> int:
        """Nodes of `model` and of that telemetry tier free during [start, end)."""
        return sum(1 for i in self._free.get(model, ()) if self.nodes[i].smi_only == smi_only
                   and all(e <= start or s >= end for s, e in self._busy.get(i, ())))

    def take(self, model: str, count: int, start: float, end: float, smi_only: bool | None = None) -> list[int]:
        """`count` whole nodes of `model` free during [start, end): of the preferred telemetry tier first, then any.
        A device never reports two workloads at one time (ingest de-duplicates on device and timestamp)."""
        busy = self._busy

        def free(i: int) -> bool:
            return all(e <= start or s >= end for s, e in busy.get(i, ()))

        cands = [i for i in self._free[model] if free(i)]
        if smi_only is not None:
            cands.sort(key=lambda i: self.nodes[i].smi_only != smi_only)
        if len(cands) < count:
            raise ValueError(f"fleet has {len(cands)} free {model} nodes, job needs {count}")
        got = cands[:count]
        for i in got:
            busy.setdefault(i, []).append((start, end))
        # Rotate so the next job starts looking elsewhere (spreads jobs over the fleet).
        self._free[model] = [i for i in self._free[model] if i not in got] + got
        return got


def build_fleet(rng: np.random.Generator, counts: dict[str, int], smi_share: float) -> Fleet:
    """`counts` nodes per model; exactly round(smi_share x nodes) of each model report nvidia-smi fields only."""
    nodes: list[Node] = []
    regions = sorted(REGIONS)
    for model in sorted(counts):
        n_model = counts[model]
        smi = np.zeros(n_model, dtype=bool)
        smi[rng.permutation(n_model)[: round(smi_share * n_model)]] = True
        for j in range(n_model):
            i = len(nodes)
            region = regions[i % len(regions)]
            dcs = REGIONS[region]
            nodes.append(Node(
                index=i, name=f"node-{model.lower()}-{i:05d}", model=model, region=region,
                datacenter=dcs[(i // len(regions)) % len(dcs)], interconnect_gbps=INTERCONNECT_GBPS[model],
                smi_only=bool(smi[j]),
            ))
    return Fleet(nodes)
