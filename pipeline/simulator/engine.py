"""Block-by-block generation: samples of every active workload, then the stream's imperfections.

Simulated time is cut into blocks of `block_s` seconds (a multiple of the 60 s window). Each block's samples
are generated for all active workloads at once (numpy), then gaps, malformed messages, duplicates and late
arrival are applied; samples are delivered in arrival order, and those that arrive after the block's end are
carried into the next block. Every random draw is seeded by (seed, workload, block), so output is a pure
function of the scenario and seed. Generation never sleeps: simulated time is data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.simulator.archetypes import render
from pipeline.simulator.fleet import GPUS_PER_NODE
from pipeline.simulator.scenario import Scenario
from schemas.telemetry import METRIC_FIELDS

MAL_NONE, MAL_JSON, MAL_RANGE, MAL_MISSING = 0, 1, 2, 3
#: A sample is "late" when it arrives more than this after its event time (an exporter delivers in ~1 interval).
LATE_AFTER_S = 60.0


@dataclass
class Block:
    """Samples as columns. `cols` holds every metric (NaN: not generated for this part) plus tensor truth."""

    ts: np.ndarray  # float64 event time
    wl: np.ndarray  # int32 workload index
    dev: np.ndarray  # int32 global device index (node * 8 + gpu)
    cols: dict[str, np.ndarray]
    arrival: np.ndarray  # float64
    dup: np.ndarray  # bool: a re-delivered copy
    mal: np.ndarray  # int8 malformed kind

    def __len__(self) -> int:
        return int(self.ts.size)

    def take(self, idx: np.ndarray) -> Block:
        return Block(self.ts[idx], self.wl[idx], self.dev[idx], {k: v[idx] for k, v in self.cols.items()},
                     self.arrival[idx], self.dup[idx], self.mal[idx])

    @staticmethod
    def concat(blocks: list[Block]) -> Block:
        blocks = [b for b in blocks if len(b)]
        if not blocks:
            return Block.empty()
        if len(blocks) == 1:
            return blocks[0]
        keys = blocks[0].cols.keys()
        return Block(np.concatenate([b.ts for b in blocks]), np.concatenate([b.wl for b in blocks]),
                     np.concatenate([b.dev for b in blocks]),
                     {k: np.concatenate([b.cols[k] for b in blocks]) for k in keys},
                     np.concatenate([b.arrival for b in blocks]), np.concatenate([b.dup for b in blocks]),
                     np.concatenate([b.mal for b in blocks]))

    @staticmethod
    def empty() -> Block:
        z = np.empty(0)
        return Block(z, z.astype(np.int32), z.astype(np.int32), {k: z for k in (*METRIC_FIELDS,)}, z,
                     z.astype(bool), z.astype(np.int8))


@dataclass
class TruthBlock:
    """The valid, unique samples of one block, in event-time generation order, with their true FLOP."""

    ts: np.ndarray
    wl: np.ndarray
    flop: np.ndarray


def _generate(sc: Scenario, b: int, c0: float, c1: float) -> Block:
    parts_ts, parts_wl, parts_dev, parts_cols = [], [], [], []
    for w in sc.active(c0, c1):
        t = w.steps_in(c0, c1)
        if t.size == 0:
            continue
        node = sc.fleet.nodes[w.nodes[0]]
        acc = node.accelerator
        rng = np.random.default_rng([sc.seed, w.index, b])
        cols = render(w, t, rng, acc.tdp_w or 300.0, acc.memory_gib or 80.0, node.interconnect_gbps)
        devs = (np.asarray(w.nodes, dtype=np.int32)[:, None] * GPUS_PER_NODE
                + np.arange(w.gpus_per_node, dtype=np.int32)[None, :]).reshape(-1)
        parts_ts.append(np.repeat(t, devs.size))
        parts_dev.append(np.tile(devs, t.size))
        parts_wl.append(np.full(t.size * devs.size, w.index, dtype=np.int32))
        parts_cols.append(cols)
    if not parts_ts:
        return Block.empty()
    n = sum(p.size for p in parts_ts)
    cols = {}
    for k in METRIC_FIELDS:
        cols[k] = np.concatenate([c[k] if k in c else np.full(p.size, np.nan) for c, p in zip(parts_cols, parts_ts,
                                                                                                strict=True)])
    z = np.zeros(n)
    return Block(np.concatenate(parts_ts), np.concatenate(parts_wl), np.concatenate(parts_dev), cols, z,
                 np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int8))


def iter_blocks(sc: Scenario) -> Iterator[tuple[Block, TruthBlock, int]]:
    """Yield (delivered samples in arrival order, truth of the block, gaps dropped) per block."""
    f = sc.faults
    carry = Block.empty()
    n_blocks = int(np.ceil((sc.t_end - sc.t_start) / sc.block_s))
    interval = sc.interval_by_wl
    peak = sc.peak_by_wl
    for b in range(n_blocks):
        c0 = sc.t_start + b * sc.block_s
        c1 = c0 + sc.block_s
        blk = _generate(sc, b, c0, c1)
        rng = np.random.default_rng([sc.seed, 0x5EED, b])
        n = len(blk)
        keep = rng.random(n) >= f.gap_share
        gaps = int(n - keep.sum())
        blk = blk.take(np.flatnonzero(keep))
        n = len(blk)
        mal_pick = rng.random(n) < f.malformed_share
        blk.mal[mal_pick] = rng.integers(MAL_JSON, MAL_MISSING + 1, int(mal_pick.sum()), dtype=np.int8)
        valid = ~mal_pick
        iv = interval[blk.wl]
        flop = iv * peak[blk.wl] * blk.cols["tensor_active"]
        truth = TruthBlock(blk.ts[valid], blk.wl[valid], flop[valid])
        # Delivery: an exporter ships each sample within one interval; some arrive minutes late (retries,
        # a stalled collector); some are delivered twice (at-least-once producers).
        blk.arrival = blk.ts + iv * (0.2 + 0.7 * rng.random(n))
        late = rng.random(n) < f.late_share
        blk.arrival[late] += rng.uniform(LATE_AFTER_S + 30.0, f.max_late_s, int(late.sum()))
        dups = np.flatnonzero(valid & (rng.random(n) < f.duplicate_share))
        dup = blk.take(dups)
        dup.dup[:] = True
        dup.arrival = dup.arrival + rng.uniform(1.0, 120.0, dups.size)
        pending = Block.concat([carry, blk, dup])
        order = np.argsort(pending.arrival, kind="stable")
        pending = pending.take(order)
        cut = int(np.searchsorted(pending.arrival, c1, side="left")) if b < n_blocks - 1 else len(pending)
        carry = pending.take(np.arange(cut, len(pending)))
        yield pending.take(np.arange(cut)), truth, gaps
