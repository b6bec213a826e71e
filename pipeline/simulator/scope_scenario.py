"""The `scope` scenario: accounts whose use changes in scope on purpose, each labelled with when and how, beside
accounts whose use never changes (the false-alarm controls). docs/simulator.md "Scope-change labels".

Change kinds (the label's t_change is when the new use or reservation begins):
- inference_to_training: serving on 1-4 GPUs, then a 16-32 GPU pretraining run (DCGM nodes).
- finetune_to_pretrain: full fine-tuning on 2-4 GPUs, then a 24-32 GPU pretraining run.
- reservation_growth: serving on 1-4 GPUs under a reservation of that size, which grows to 16-64 devices.
- smi_inference_to_training: inference_to_training on nodes that report nvidia-smi fields only.
- inference_to_finetune: serving on 4 GPUs, then full fine-tuning on 8 while serving goes on: at most 3x the
  devices and a device-weighted P(training) that stays below the training band, so only the compute rate moves
  far (the hardest kind here).
Controls (no change): steady_inference, steady_training (one size from first use), bursty_batch_inference (small
serving with 8-16 GPU offline batch jobs now and then) and steady_hpc (FP64 simulation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.simulator.accounts import make_cip
from pipeline.simulator.builder import Builder
from pipeline.simulator.fleet import build_fleet
from pipeline.simulator.scenario import Faults, Scenario

H, M = 3600.0, 60.0
DURATION_S = 6 * H
CHANGE_KINDS = ("inference_to_training", "finetune_to_pretrain", "reservation_growth", "smi_inference_to_training",
                "inference_to_finetune")
CONTROL_KINDS = ("steady_inference", "steady_training", "bursty_batch_inference", "steady_hpc")
#: Half of each model's nodes report nvidia-smi fields only, whatever --smi-share says: the tier of each account
#: is part of its label, so it is fixed by design here.
SMI_SHARE = 0.5
_MODELS = ("A100", "B200", "H100", "L4", "L40S", "MI300X")


def build_scope(seed: int, p: dict[str, Any], t0: float, faults: Faults) -> Scenario:
    """`round(3 x scale)` accounts per change kind and `round(2 x scale)` per control kind, over 6 hours."""
    n_change, n_control = max(1, round(3 * p["scale"])), max(1, round(2 * p["scale"]))
    per_model = 8 + 6 * (n_change + n_control)
    fleet = build_fleet(np.random.default_rng([seed, 1]), dict.fromkeys(_MODELS, per_model), SMI_SHARE)
    b = Builder("scope", seed, fleet, t0)
    rng = np.random.default_rng([seed, 23])
    labels: list[dict[str, Any]] = []
    created = t0 - 45 * 86_400
    t_end = t0 + DURATION_S
    plan = [(k, i) for i in range(n_change) for k in CHANGE_KINDS] + [(k, i) for i in range(n_control)
                                                                        for k in CONTROL_KINDS]
    for j, (kind, i) in enumerate(plan):
        aid = f"acct-{kind.replace('_', '-')}-{i}"
        foreign = j % 2 == 0
        acct = b.account(make_cip(aid, created, name=f"Scope Co {j}", country=("BR", "US")[not foreign],
                                  us_person=not foreign), "us_person" if not foreign else "foreign_person")
        first = t0 + round(float(rng.uniform(0, 40 * M)))
        t_c = first + round(float(rng.uniform(70 * M, 3 * H)))  # >= 70 min of use before: a baseline exists
        label = _place(b, rng, kind, acct, first, t_c, t_end)
        labels.append({"account_id": aid, "kind": kind, "change": kind in CHANGE_KINDS,
                       "t_change": label["t_change"], "first_use": first, "tier": label["tier"],
                       "what": label["what"]})
    labels.sort(key=lambda x: x["account_id"])
    sc = b.build(t_end, faults, p)
    sc.scope_labels = labels
    return sc


def _pick(rng: np.random.Generator, models: tuple[str, ...]) -> tuple[str, ...]:
    """A drawn model first, then the others in order (fallbacks when the drawn one has no room)."""
    drawn = str(rng.choice(models))
    return (drawn, *(m for m in models if m != drawn))


def _job(b: Builder, rng: np.random.Generator, acct: int, arch: str, models: tuple[str, ...], n_nodes: int,
         start: float, end: float, *, smi: bool, gpus: int = 8, level: tuple[float, float] = (0.3, 0.5),
         intervals: tuple[float, ...] = (10.0, 15.0, 30.0), **kw: Any) -> int:
    """One job on nodes of the wanted tier: the first of `models` (see _pick) with room. Returns its GPUs."""
    for m in models:
        if b.fleet.free_count(m, start, end, smi) >= n_nodes:
            nodes = b.fleet.take(m, n_nodes, start, end, smi)  # the wanted tier comes first, and there is room
            break
    else:  # the label names the tier: never fall back to the other one
        raise ValueError(f"scope scenario: not enough free {'smi-only' if smi else 'DCGM'} nodes of {models}")
    b.job(acct, arch, m, n_nodes, start, end, gpus_per_node=gpus, nodes=nodes,
          interval_s=float(rng.choice(intervals)), level=float(rng.uniform(*level)),
          peak_hour=float(rng.uniform(10, 20)), **kw)
    return gpus * n_nodes


def _serving(b: Builder, rng: np.random.Generator, acct: int, start: float, end: float, *, smi: bool,
             models: tuple[str, ...] = ("L40S", "L4", "H100"), nodes: int = 1) -> int:
    gpus = int(rng.choice([1, 2, 4]))
    return _job(b, rng, acct, "serving", _pick(rng, models), nodes, start, end, smi=smi, gpus=gpus,
                level=(0.03, 0.2), intervals=(15.0, 30.0, 60.0), precision="fp8")


def _pretrain(b: Builder, rng: np.random.Generator, acct: int, start: float, t_end: float, *, smi: bool,
              nodes: tuple[int, int] = (2, 4)) -> int:
    n = int(rng.integers(nodes[0], nodes[1] + 1))
    end = min(t_end, start + float(rng.uniform(1.5 * H, 2.5 * H)))
    return _job(b, rng, acct, "pretrain", _pick(rng, ("H100", "B200", "A100")), n, start, end, smi=smi,
                level=(0.3, 0.55))


def _place(b: Builder, rng: np.random.Generator, kind: str, acct: int, first: float, t_c: float,
           t_end: float) -> dict[str, Any]:
    """The account's workloads (and reservations); its label's t_change, telemetry tier and what changed."""
    tier = "smi" if kind.startswith("smi_") else "dcgm"
    smi = tier == "smi"
    if kind in ("inference_to_training", "smi_inference_to_training"):
        before = _serving(b, rng, acct, first, t_end, smi=smi, models=("L40S", "H100") if smi else
                          ("L40S", "L4", "H100"))
        after = _pretrain(b, rng, acct, t_c, t_end, smi=smi)
        return {"t_change": t_c, "tier": tier, "what": f"serving on {before} GPUs -> pretraining on {after}"}
    if kind == "inference_to_finetune":
        before = _job(b, rng, acct, "serving", _pick(rng, ("L40S", "H100")), 1, first, t_end, smi=False, gpus=4,
                      level=(0.03, 0.2), intervals=(15.0, 30.0, 60.0), precision="fp8")
        end = min(t_end, t_c + float(rng.uniform(1.5 * H, 2.5 * H)))
        after = _job(b, rng, acct, "finetune_full", _pick(rng, ("H100", "A100")), 1, t_c, end, smi=False,
                     level=(0.25, 0.45))
        return {"t_change": t_c, "tier": tier, "what": f"serving on {before} GPUs -> plus fine-tuning on {after}"}
    if kind == "finetune_to_pretrain":
        gpus = int(rng.choice([2, 4]))
        _job(b, rng, acct, "finetune_full", _pick(rng, ("H100", "A100")), 1, first,
             t_c + round(float(rng.uniform(0, 30 * M))), smi=False, gpus=gpus, level=(0.25, 0.45))
        after = _pretrain(b, rng, acct, t_c, t_end, smi=False, nodes=(3, 4))
        return {"t_change": t_c, "tier": tier, "what": f"fine-tuning on {gpus} GPUs -> pretraining on {after}"}
    if kind == "reservation_growth":
        before = _serving(b, rng, acct, first, t_end, smi=False)
        grown = int(rng.choice([16, 32, 64]))
        model = str(rng.choice(("H100", "B200")))
        until = t_end + 12 * H
        b.reserve(acct, model, [(first, before, until), (t_c, grown, until)])
        return {"t_change": t_c, "tier": tier, "what": f"reservation {before} -> {grown} {model} (serving on "
                                                       f"{before} GPUs)"}
    # Controls: nothing changes; t_change is None.
    if kind == "steady_inference":
        gpus = _serving(b, rng, acct, first, t_end, smi=False, nodes=int(rng.integers(1, 4)))
        what = f"serving on {gpus} GPUs"
    elif kind == "steady_training":
        n = int(rng.integers(2, 5))
        _job(b, rng, acct, "pretrain", _pick(rng, ("H100", "B200", "A100")), n, first, t_end, smi=False)
        what = f"pretraining on {8 * n} GPUs from first use"
    elif kind == "bursty_batch_inference":
        gpus = _serving(b, rng, acct, first, t_end, smi=False)
        t, bursts = first + round(float(rng.uniform(30 * M, 90 * M))), 0
        while t + 30 * M < t_end:
            length = round(float(rng.uniform(30 * M, 60 * M)))
            _job(b, rng, acct, "batch_inference", _pick(rng, ("H100", "A100")),
                 int(rng.integers(1, 3)), t, min(t_end, t + length), smi=False, level=(0.25, 0.5), precision="fp8")
            bursts += 1
            t += length + round(float(rng.uniform(45 * M, 90 * M)))
        what = f"serving on {gpus} GPUs with {bursts} batch-inference bursts of 8-16 GPUs"
    else:  # steady_hpc
        n = int(rng.integers(2, 4))
        _job(b, rng, acct, "hpc_fp64", _pick(rng, ("MI300X", "H100")), n, first, t_end, smi=False,
             level=(0.2, 0.5), intervals=(15.0, 30.0), precision="fp64")
        what = f"FP64 simulation on {8 * n} GPUs"
    return {"t_change": None, "tier": "dcgm", "what": what}
