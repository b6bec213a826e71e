"""Workload archetypes: vectorised generators of per-device signals over a block of sample times.

Each archetype turns (workload, times) into *shapes*: tensor-pipe activity (the truth that FLOP is computed
from), engine activity, DRAM, NVLink and network fractions, memory fraction, nvidia-smi utilisation and a power
modulation. `render()` turns shapes into the physical fields of a TelemetrySample (MiB, W, MHz, bytes/s).

What separates training from inference is what real traces say separates them: synchrony of one job's GPUs
across nodes (all-reduce, checkpoints), scale and duration, network traffic; coarse utilisation and power are
drawn from overlapping ranges (docs/simulator.md, "Calibration").
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from pipeline.simulator.fleet import CLOCKS
from pipeline.simulator.workload import Workload

_U64 = np.uint64


def hashed_normal(key: int, idx: np.ndarray) -> np.ndarray:
    """Standard normals that depend only on (key, idx): noise shared by every job of one synchronised run,
    whatever block the times fall in."""
    x = idx.astype(np.uint64) * _U64(0x9E3779B97F4A7C15) + _U64((key * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF)

    def mix(z: np.ndarray) -> np.ndarray:
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))

    u1 = ((mix(x) >> _U64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = ((mix(x + _U64(1)) >> _U64(11)).astype(np.float64) + 0.5) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass
class Shapes:
    ta: np.ndarray  # tensor pipe active (truth), (n_t, n_dev)
    act: np.ndarray  # graphics engine active
    dram: np.ndarray
    nvl: np.ndarray  # fraction of ~150 GB/s per direction
    net: np.ndarray  # fraction of the node NIC share of this device
    fb: np.ndarray  # fraction of device memory used
    util: np.ndarray  # nvidia-smi utilisation, 0..1
    pw: np.ndarray  # power / TDP
    fp64: np.ndarray


def _periodic(t: np.ndarray, period: float, duration: float, phase: float) -> np.ndarray:
    """True inside a `duration`-long pause that recurs every `period` seconds (same for every device)."""
    return ((t + phase) % period) < duration


def _diurnal(t: np.ndarray, peak_hour: float, depth: float) -> np.ndarray:
    hour = (t % 86_400.0) / 3600.0
    return 1.0 - depth * 0.5 * (1.0 - np.cos(2.0 * np.pi * (hour - peak_hour) / 24.0))


def _grid(w: Workload, t: np.ndarray) -> np.ndarray:
    return np.rint((t - w.start) / w.interval_s).astype(np.int64)


def _sync(w: Workload, t: np.ndarray) -> np.ndarray:
    """Run-wide step-level fluctuation (n_t, 1): stragglers, data stalls and all-reduce waits hit every GPU."""
    return hashed_normal(w.sync_key, np.rint(t / w.interval_s).astype(np.int64))[:, None]


def _wrng(w: Workload, salt: int) -> np.random.Generator:
    """Per-workload draws that do not depend on the block (a workload's character stays the same all run)."""
    return np.random.default_rng([w.sync_key % (2**32), w.index, salt])


def _stalls(w: Workload, t: np.ndarray, share: float) -> np.ndarray:
    """(n_t, 1) True in run-wide idle stretches of ~90 s (data-loader stalls, evaluation, waiting on storage)."""
    z = hashed_normal(w.sync_key + 7, np.floor((t - w.start) / 90.0).astype(np.int64))
    return (z > NormalDist().inv_cdf(1.0 - share))[:, None]


def _train_like(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int, sync_sd: float,
                ckpt_period: float, ckpt_dur: float) -> Shapes:
    n_t = t.size
    g = _sync(w, t)
    pause = _periodic(t - w.start, ckpt_period, ckpt_dur, w.params.get("phase", 0.0))[:, None]
    busy = np.where(pause, 0.04, 1.0) * (1.0 + sync_sd * g)
    v = w.variant
    if v in ("stalled", "small_model", "input_bound"):
        # Input- or memory-bound training: the step waits on the data loader or on memory, so the coarse
        # utilisation sits at 15-70 % with idle stretches, still moving in step across the run's GPUs.
        wr = _wrng(w, 1)
        duty = float(wr.uniform(0.15, 0.45) if v == "input_bound" else wr.uniform(0.3, 0.7))
        stall = _stalls(w, t, float(wr.uniform(0.05, 0.2)))
        busy = busy * np.where(stall, 0.03, duty * (1.0 + 0.2 * g))
    ta = w.level * busy + 0.004 * rng.standard_normal((n_t, n_dev))
    act = np.clip(0.93 * busy + 0.02 * rng.standard_normal((n_t, n_dev)), 0.0, 1.0)
    multi = len(w.nodes) > 1
    net = (0.35 if multi else 0.002) * busy * (1.0 + 0.05 * rng.standard_normal((n_t, n_dev)))
    # all-reduce over NVLink needs a peer: a job on one GPU of a node has none (its draws are kept either way)
    nvl = (0.45 if w.gpus_per_node > 1 else 0.0) * busy * (1.0 + 0.05 * rng.standard_normal((n_t, n_dev)))
    fb_level = w.params.get("fb", 0.85)
    if v in ("small_model", "input_bound"):
        fb_level = float(_wrng(w, 2).uniform(0.08, 0.5))  # small models and adapters leave most memory free
    elif v == "stalled":
        fb_level = float(_wrng(w, 2).uniform(0.3, 0.9))
    fb = np.full((n_t, n_dev), fb_level) + 0.003 * rng.standard_normal((n_t, n_dev))
    util = np.clip(act * 1.05 + 0.02, 0.0, 1.0)
    dram = 0.38 * busy + 0.02 * rng.standard_normal((n_t, n_dev))
    if v in ("small_model", "input_bound", "stalled"):
        dram = dram + 0.25 * busy  # memory-bound steps: DRAM busy for the work done
    return Shapes(ta, act, dram, nvl, net, fb, util, act, np.zeros((n_t, n_dev)))


def pretrain(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    return _train_like(w, t, rng, n_dev, 0.08, w.params.get("ckpt_period", 1800.0), w.params.get("ckpt_dur", 120.0))


def finetune_full(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    return _train_like(w, t, rng, n_dev, 0.06, w.params.get("ckpt_period", 900.0), w.params.get("ckpt_dur", 60.0))


def diffusion_train(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    s = _train_like(w, t, rng, n_dev, 0.07, w.params.get("ckpt_period", 1200.0), w.params.get("ckpt_dur", 90.0))
    s.dram = np.clip(s.dram * 1.5, 0.0, 1.0)  # convolutions and attention over large activations
    return s


def throttled_train(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    """Evasion: training duty-cycled to low mean utilisation; still synchronised across the run."""
    s = _train_like(w, t, rng, n_dev, 0.08, 3600.0, 0.0)
    on = _periodic(t - w.start, w.params.get("duty_period", 600.0), w.params.get("duty_on", 150.0), 0.0)[:, None]
    k = np.where(on, 1.0, 0.03)
    s.ta, s.act, s.net, s.nvl, s.dram = s.ta * k, s.act * k, s.net * k, s.nvl * k, s.dram * k
    s.util, s.pw = np.clip(s.act * 1.05 + 0.02, 0.0, 1.0), s.act
    return s


def finetune_lora(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    """Pipeline-style LoRA: the GPUs of a node take turns, so each shows ~9 % utilisation and ~0.23 TDP.
    Variant `input_bound`: data-parallel LoRA waiting on its data loader, every GPU at 15-45 %."""
    if w.variant == "input_bound":
        s = _train_like(w, t, rng, n_dev, 0.08, 1800.0, 30.0)
        s.ta = s.ta * 0.5
        return s
    n_t = t.size
    turn = (_grid(w, t)[:, None] + np.arange(n_dev)[None, :]) % max(w.gpus_per_node, 1) == 0
    g = _sync(w, t)
    busy = np.where(turn, 0.55, 0.035) * (1.0 + 0.1 * g) * (1.0 + 0.1 * rng.standard_normal((n_t, n_dev)))
    busy = np.clip(busy, 0.0, 1.0)
    ta = w.level * busy / 0.1
    net = (0.05 if len(w.nodes) > 1 else 0.001) * busy
    fb = np.full((n_t, n_dev), w.params.get("fb", 0.45)) + 0.003 * rng.standard_normal((n_t, n_dev))
    return Shapes(ta, busy, 0.3 * busy, 0.1 * busy, net, fb, np.clip(busy * 1.1, 0, 1), busy, np.zeros_like(busy))


def serving(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    """Online inference: diurnal load, bursty per replica (node), KV cache grows with load. The GPUs of one
    tensor-parallel replica move together; replicas on different nodes are independent."""
    n_t, g = t.size, w.gpus_per_node
    if w.variant == "busy_flat":
        # A saturated replica pool (batched LLM serving under steady demand): flat, busy, and its KV cache
        # pre-allocated (vLLM-style ~90 % of memory), so neither utilisation nor memory breathes.
        wr = _wrng(w, 3)
        lvl = float(wr.uniform(0.75, 0.97))
        own = 1.0 + 0.04 * rng.standard_normal((n_t, n_dev))
        load = np.repeat(lvl * np.exp(0.05 * rng.standard_normal((n_t, len(w.nodes)))), g, axis=1)
        ta = w.level * load * own
        act = np.clip(load * own, 0.0, 1.0)
        fb = np.full((n_t, n_dev), float(wr.uniform(0.85, 0.93))) + 0.002 * rng.standard_normal((n_t, n_dev))
        return Shapes(ta, act, np.clip(0.2 + 0.5 * load, 0, 1), (0.08 if g > 1 else 0.0) * load, 0.004 * load, fb,
                      np.clip(act * 1.02 + 0.02, 0.0, 1.0), act, np.zeros((n_t, n_dev)))
    d = _diurnal(t, w.params.get("peak_hour", 15.0), w.params.get("depth", 0.7))[:, None]
    n_nodes = len(w.nodes)
    burst = np.exp(0.35 * rng.standard_normal((n_t, n_nodes)) - 0.06)  # independent per replica
    load = np.repeat(np.clip(d * burst, 0.0, 1.6), g, axis=1)
    ta = w.level * load * (1.0 + 0.03 * rng.standard_normal((n_t, n_dev)))
    act = np.clip(0.12 + 0.6 * load, 0.0, 1.0) * (1.0 + 0.03 * rng.standard_normal((n_t, n_dev)))
    fb = np.clip(w.params.get("fb", 0.55) + 0.25 * np.clip(load, 0, 1.2) / 1.2, 0.0, 0.97)
    if w.variant == "low_load":
        # A small model or few users (a benchmark, an internal endpoint): requests arrive now and then, each a short
        # burst of decode kernels; the engine idles in between and a small model's KV cache leaves memory free.
        # Utilisation 5-30 %, little tensor or DRAM work, low power: the region where input-bound training sits.
        wr = _wrng(w, 6)
        demand = float(wr.uniform(0.05, 0.35))
        load = load * demand
        ta = w.level * load * (1.0 + 0.03 * rng.standard_normal((n_t, n_dev)))
        act = np.clip(0.01 + 0.6 * load * np.exp(0.4 * rng.standard_normal((n_t, n_dev))), 0.0, 1.0)
        fb = float(wr.uniform(0.02, 0.3)) + 0.05 * np.clip(load, 0, 1.2)
    dram = np.clip((0.005 if w.variant == "low_load" else 0.15) + 0.45 * load, 0.0, 1.0)  # decode is memory-bound
    nvl = (0.08 if g > 1 else 0.0) * load
    net = 0.004 * load
    util = np.clip(act * 1.15 + 0.03, 0.0, 1.0)
    return Shapes(ta, act, dram, nvl, net, fb, util, act, np.zeros((n_t, n_dev)))


def batch_inference(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    """Offline batched generation: sustained high load like training, but every GPU on its own clock."""
    n_t = t.size
    own = 1.0 + 0.08 * rng.standard_normal((n_t, n_dev))
    ta = w.level * own
    act = np.clip(0.9 * own, 0.0, 1.0)
    if w.variant == "memory_bound":  # long contexts: decode waits on memory, the engine idles between kernels
        own = own * float(_wrng(w, 4).uniform(0.4, 0.8))
        ta, act = w.level * own, np.clip(0.9 * own, 0.0, 1.0)
    fb = np.full((n_t, n_dev), w.params.get("fb", 0.8)) + 0.01 * rng.standard_normal((n_t, n_dev))
    return Shapes(ta, act, np.clip(0.5 * own, 0, 1), 0.05 * own, 0.003 * own, fb, np.clip(act + 0.04, 0, 1), act,
                  np.zeros((n_t, n_dev)))


def hpc_fp64(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    """Bulk-synchronous FP64 simulation: DMMA tensor work, halo exchange on the network, periodic I/O."""
    s = _train_like(w, t, rng, n_dev, 0.05, w.params.get("ckpt_period", 3600.0), w.params.get("ckpt_dur", 200.0))
    s.fp64 = np.clip(1.4 * s.ta, 0.0, 1.0)
    s.nvl, s.net = s.nvl * 0.3, s.net * 0.4
    if w.variant != "training_like":  # the variant keeps training's utilisation, memory, power and clocks
        s.util = np.clip(s.act * 0.9 + 0.05, 0.0, 1.0)
    return s


def mining(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    """Memory-hard hashing: DRAM saturated, tensor pipe idle, 100 % 'utilisation'."""
    n_t = t.size
    noise = 0.01 * rng.standard_normal((n_t, n_dev))
    ta = np.abs(0.002 + 0.001 * rng.standard_normal((n_t, n_dev))) * (w.level > 0)
    fb = np.full((n_t, n_dev), w.params.get("fb", 0.12))
    return Shapes(ta, np.clip(0.97 + noise, 0, 1), np.clip(0.93 + noise, 0, 1), 0.0 * noise, 0.0001 + 0.0 * noise,
                  fb, np.ones((n_t, n_dev)), np.clip(0.97 + noise, 0, 1), np.zeros((n_t, n_dev)))


def idle_reserved(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    n_t = t.size
    z = np.zeros((n_t, n_dev))
    fb = np.full((n_t, n_dev), w.params.get("fb", 0.006))
    return Shapes(z, z.copy(), z.copy(), z.copy(), z.copy(), fb, z.copy(), z.copy(), z.copy())


def interleaved(w: Workload, t: np.ndarray, rng: np.random.Generator, n_dev: int) -> Shapes:
    """Evasion: training phases interleaved with serving phases on the same allocation."""
    tr = pretrain(w, t, rng, n_dev)
    sv = serving(w, t, rng, n_dev)
    phase = _periodic(t - w.start, w.params.get("swap_period", 1800.0), w.params.get("train_part", 900.0), 0.0)
    m = phase[:, None]
    sv.ta = sv.ta * 0.3
    return Shapes(*(np.where(m, getattr(tr, f), getattr(sv, f)) for f in Shapes.__dataclass_fields__))


GENERATORS = {
    "pretrain": pretrain,
    "finetune_full": finetune_full,
    "finetune_lora": finetune_lora,
    "diffusion_train": diffusion_train,
    "throttled_train": throttled_train,
    "interleaved": interleaved,
    "serving": serving,
    "batch_inference": batch_inference,
    "hpc_fp64": hpc_fp64,
    "mining": mining,
    "idle_reserved": idle_reserved,
}

#: Mean power of a variant relative to its archetype's draw (builder.POWER_FRAC): input-bound training draws
#: less, a saturated serving pool and training-like HPC more.
_VARIANT_POWER = {"stalled": 0.8, "small_model": 0.75, "input_bound": 0.9, "busy_flat": 1.5, "memory_bound": 0.85,
                  "training_like": 1.2, "low_load": 0.6}
_NVLINK_BPS = 150e9  # per direction, per GPU, order of magnitude for NVLink 4 all-reduce traffic
_PCIE_ONLY = ("L40S", "L4")


def render(w: Workload, t: np.ndarray, rng: np.random.Generator, tdp_w: float, memory_gib: float,
           interconnect_gbps: float) -> dict[str, np.ndarray]:
    """All metric columns, flattened time-major to (n_t * n_dev,), rounded as an exporter would print them.

    `tensor_active` is the truth; a node that reports only nvidia-smi fields drops it when written, not here.
    """
    n_dev = w.device_count
    s = GENERATORS[w.archetype](w, t, rng, n_dev)
    n_t = t.size
    ta = np.clip(s.ta, 0.0, 1.0)
    act = np.clip(np.maximum(s.act, ta), 0.0, 1.0)
    noise = rng.standard_normal((n_t, n_dev))
    mem_mib = memory_gib * 1024.0
    fb_used = np.rint(np.clip(s.fb, 0.003, 0.99) * mem_mib)
    # Power: the workload's mean fraction of TDP, modulated by activity around its own nominal level.
    nominal = max(float(np.mean(s.pw)) if s.pw.size else 0.0, 1e-3)
    realism = w.source_family != "default"
    wr = _wrng(w, 5)
    # Realism (random-mix scenarios): how closely power follows activity, and the part's sustained clock
    # (boost, power cap, thermal throttling), are properties of the node and the job, not of the class.
    coupling = float(wr.uniform(0.15, 0.6)) if realism else 0.4
    base_frac = w.power_frac * _VARIANT_POWER.get(w.variant or "", 1.0)
    drift = 0.06 * hashed_normal(w.sync_key + 11, np.floor(t / 300.0).astype(np.int64))[:, None] if realism else 0.0
    if realism and not s.pw.any():
        # nothing runs: the part's idle draw with memory held (10-20 % of TDP; the real H200 idled at 17.6 %)
        base_frac, coupling = float(_wrng(w, 7).uniform(0.1, 0.2)), 0.0
    pw = base_frac * ((1.0 - coupling) + coupling * s.pw / nominal) * (1.0 + drift) + 0.015 * noise
    power = np.clip(pw, 0.06, 1.02) * tdp_w
    sm_max, mem_clk = CLOCKS[w.model]
    clock_cap = float(wr.uniform(0.72, 1.0)) if realism else 1.0
    busy_clock = sm_max * clock_cap * (0.93 + 0.05 * np.clip(1.0 - pw, 0, 1))
    if realism:
        busy_clock = busy_clock * (1.0 + 0.02 * rng.standard_normal((n_t, n_dev)))
    # An idle GPU drops to its idle clock, unless the node holds application clocks (persistence mode, a
    # framework's context kept open): then it idles at its sustained clock whatever the job is (realism only).
    idle_clock = sm_max * clock_cap if realism and float(wr.uniform()) < 0.5 else sm_max * 0.17
    sm_clock = np.rint(np.where(act > 0.05, np.minimum(busy_clock, sm_max), idle_clock))
    ic_per_dev = interconnect_gbps * 1e9 / 8.0 / 8.0  # bytes/s of the node NIC per GPU
    sm_active = np.clip(act * (0.9 + 0.05 * noise), 0.0, 1.0)
    cols = {
        "tensor_active": ta,
        "gr_engine_active": act,
        "sm_active": sm_active,
        "sm_occupancy": np.clip(sm_active * 0.45, 0.0, 1.0),
        "dram_active": np.clip(s.dram, 0.0, 1.0),
        "fp64_active": np.clip(s.fp64, 0.0, 1.0),
        "fp32_active": np.clip(0.08 * act, 0.0, 1.0),
        "fp16_active": np.clip(0.03 * act, 0.0, 1.0),
        "gpu_util": np.clip(s.util * 100.0 + 2.0 * noise, 0.0, 100.0),
        "mem_copy_util": np.clip(s.dram * 80.0, 0.0, 100.0),
        "fb_used_mib": fb_used,
        "fb_free_mib": mem_mib - fb_used,
        "power_w": power,
        "sm_clock_mhz": sm_clock,
        "mem_clock_mhz": np.full((n_t, n_dev), float(mem_clk)),
        "pcie_tx_bytes": np.rint(np.clip(2e8 * act + 1e6, 0, None)),
        "pcie_rx_bytes": np.rint(np.clip(5e8 * act + 1e6, 0, None)),
        "net_tx_bytes": np.rint(np.clip(s.net, 0.0, 1.0) * ic_per_dev),
        "net_rx_bytes": np.rint(np.clip(s.net, 0.0, 1.0) * ic_per_dev),
        # A counter: energy since driver load, from the workload's mean power (monotone across blocks).
        "energy_mj": np.rint((w.params.get("energy0", 1e9) + (t[:, None] - w.start) * w.power_frac * tdp_w * 1e3)
                             * np.ones((1, n_dev))),
    }
    if w.model not in _PCIE_ONLY:
        nv = np.rint(np.clip(s.nvl, 0.0, 1.0) * _NVLINK_BPS)
        cols["nvlink_tx_bytes"] = nv
        cols["nvlink_rx_bytes"] = nv
    out = {}
    for name, v in cols.items():
        v = np.broadcast_to(v, (n_t, n_dev)).reshape(-1)
        if name in ("gpu_util", "mem_copy_util") or name == "power_w":
            v = np.round(v, 1)
        elif name not in ("fb_used_mib", "fb_free_mib") and not name.endswith(("_bytes", "mhz", "mj")):
            v = np.round(v, 4)
        out[name] = v
    return out
