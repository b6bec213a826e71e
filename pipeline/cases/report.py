"""The draft report of a case, as a JSON-ready dict and as Markdown.

Contents follow the proposed 15 CFR 7.308 / EO 14110 s4.2(c)(i) minimum (shared reference/regulation.md): the
identity of the foreign person (name, address, means and source of payment, email addresses, telephone numbers,
IP addresses with the time of each access) and the existence of the training run; plus what an analyst needs to
defend it: the run's description, the compute estimate with its band and basis, every detector's figures and
windows, the classifier's verdict, knowledge and due dates, and the policy id and version. Always a DRAFT; a
DEMO banner too when the policy is a scaled-down demonstration profile.

Detector evidence is read by the detectors' own names (the first found, latest figures first; absent = "not in
evidence"): `run` = {run_id, accelerators (model -> devices), device_count, node_count, start, end, job_ids,
workload_ids}, `used_flop`, `used_flop_low`, `used_flop_high`, `projected_flop`, `rate_flops`, `reserved_until`,
`basis` (basis -> window count, or one basis name), `classifier`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.case import REPORTABLE_STATUSES, Case
from schemas.errors import PolicyError
from schemas.policy import Policy, load_policy

DRAFT_BANNER = "DRAFT - NOT FILED. Prepared automatically for review by compliance staff; verify before filing."
DEMO_BANNER = "DEMO - scaled-down demonstration policy, NOT a compliance determination. Do not file."
IDENTITY_FIELDS = ("name", "address", "payment_means", "payment_source", "emails", "phones", "ip_addresses")
_ABSENT = "not in evidence"
#: The feed message field that holds the identity a feed report refers to (pipeline/cases/feed.py).
IDENTITY_REF = "identity"
_TIME_SUFFIXES = ("_at", "_time", "start", "end", "first_seen", "last_seen")


def utc(t: float | None) -> str | None:
    """ISO 8601 UTC text of an epoch time (None stays None; a time no calendar holds, e.g. NaN, says so instead of
    raising, so one bad stored value cannot stop `cases show`)."""
    if t is None:
        return None
    try:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return f"invalid time ({t!r})"


def _policy_for(case: Case, policy: Policy | None) -> Policy | None:
    if policy is not None and policy.id == case.policy_id:
        return policy
    try:
        return load_policy(case.policy_id)
    except PolicyError:
        return policy


def _as_of(entry: dict[str, Any]) -> float:
    """When the entry's figures were taken: its run's last window end, else its event time (two detections of one
    run can share a crossing time while one of them saw many more windows)."""
    run = (entry.get("evidence") or {}).get("run")
    end = run.get("end") if isinstance(run, dict) else None
    return float(end) if isinstance(end, int | float) else float(entry["event_time"])


def _entries(case: Case) -> list[dict[str, Any]]:
    """The case's detection entries, latest figures first (ties: newest event first)."""
    found = [{"detection_id": k, **v} for k, v in case.evidence.get("detections", {}).items()]
    return sorted(found, key=lambda e: (-_as_of(e), -e["event_time"], e["detection_id"]))


def _first(entries: list[dict[str, Any]], *keys: str) -> Any:
    for e in entries:
        ev = e.get("evidence") or {}
        for k in keys:
            if ev.get(k) is not None:
                return ev[k]
    return None


def identity_block(case: Case) -> dict[str, Any]:
    """The report's identity of the foreign person (PII), from the case's CIP snapshot."""
    ident = case.identity
    ips = [{**ip, "accessed_at_utc": utc(ip.get("accessed_at"))} for ip in ident.get("ip_addresses") or []]
    out: dict[str, Any] = {k: ident.get(k) for k in IDENTITY_FIELDS}
    out["emails"] = ident.get("emails") or []
    out["phones"] = ident.get("phones") or []
    out["ip_addresses"] = ips
    for k in ("customer_type", "country", "us_person", "national_id", "beneficial_owners", "reseller",
              "verification_status", "subject_owner"):
        out[k] = ident.get(k)
    out["account_id"] = case.account_id
    out["cip_on_file"] = bool(ident.get("cip_on_file"))
    out["cip_updated_at"] = utc(ident.get("cip_updated_at"))
    absent = [k for k in IDENTITY_FIELDS if out[k] in (None, [], "")]
    out["missing"] = (["cip_record"] if not out["cip_on_file"] else []) + absent
    return out


#: Readable names of the compute bases (detectors/compute.py).
BASIS_TEXT = {
    "tensor_active": "tensor-pipe activity x peak",
    "utilisation_power": "utilisation and power (weaker)",
    "mixed": "mixed bases within a window",
    "none": "no usable activity field (not counted)",
    "unknown_accelerator": "accelerator model unknown or not reported: the catalog's median peak, band from its "
                           "slowest to its fastest part (wide)",
}


def basis_text(basis: Any) -> str:
    """'tensor-pipe activity x peak (3 windows); utilisation and power (weaker) (1 window)', most windows first."""
    if not basis:
        return _ABSENT
    if isinstance(basis, str):
        return BASIS_TEXT.get(basis, basis)
    if not isinstance(basis, dict):
        return str(basis)
    parts = sorted(basis.items(), key=lambda kv: (-kv[1], kv[0]))
    return "; ".join(f"{BASIS_TEXT.get(b, b)} ({n} window{'s' if n != 1 else ''})" for b, n in parts)


def _training_run(case: Case, entries: list[dict[str, Any]]) -> dict[str, Any]:
    desc = _first(entries, "run") or {}
    start, end = desc.get("start"), desc.get("end")
    duration = end - start if start is not None and end is not None else None
    workloads = sorted(
        {w for e in entries for w in e.get("workload_ids") or []} | set(desc.get("workload_ids") or [])
    )
    run = {
        "run_id": case.run_id or desc.get("run_id"),
        "run_ids": desc.get("run_ids") or [],
        "accelerators": desc.get("accelerators") or {},
        "device_count": desc.get("device_count"),
        "node_count": desc.get("node_count"),
        "start": start,
        "start_utc": utc(start),
        "end": end,
        "end_utc": utc(end),
        "duration_s": duration,
        "workloads": workloads,
        # a detection lists its first workloads and counts them all (detectors/base.py WORKLOAD_IDS_K)
        "workload_count": max([len(workloads)] + [int((e.get("evidence") or {}).get("workload_ids_total") or 0)
                                                  for e in entries]),
        "jobs": desc.get("job_ids") or [],
    }
    accel = ", ".join(f"{n} x {m}" for m, n in sorted(run["accelerators"].items())) or "accelerators " + _ABSENT
    hours = f"{duration / 3600:.1f} h" if duration is not None else "duration " + _ABSENT
    owner = case.beneficial_owner_id
    subject = f"beneficial owner {owner}" if owner else f"account {case.account_id}"
    if case.run_id or case.reason in ("owner_aggregate",) or workloads:
        run["exists"] = True
        run["description"] = (
            f"A large AI model training run ({case.run_id or case.reason}) by {subject} on {accel}, "
            f"{hours}, {len(workloads)} workload(s)."
        )
    else:
        run["exists"] = False
        run["description"] = f"No training run is attached to this case (reason: {case.reason})."
    return run


def _compute(entries: list[dict[str, Any]], policy: Policy | None) -> dict[str, Any]:
    basis = _first(entries, "basis")
    return {
        "estimate_flop": _first(entries, "used_flop"),
        "band_low_flop": _first(entries, "used_flop_low"),
        "band_high_flop": _first(entries, "used_flop_high"),
        "projected_flop": _first(entries, "projected_flop"),
        "rate_flops": _first(entries, "rate_flops"),
        "reserved_until": _first(entries, "reserved_until"),
        "basis": basis_text(basis),
        "basis_windows": basis if isinstance(basis, dict) else {},
        "threshold_flop": policy.thresholds.training_ops if policy else None,
    }


def _evidence(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in sorted(entries, key=lambda x: (x["event_time"], x["detection_id"])):
        ev = e.get("evidence") or {}
        classifier = ev.get("classifier") or {k: ev[k] for k in ("p_training", "verdict") if k in ev} or None
        out.append({
            "detection_id": e["detection_id"],
            "detector": f"{e['detector_id']} v{e['detector_version']}",
            "outcome": e["outcome"],
            "reason": e["reason"],
            "severity": e.get("severity"),
            "event_time": e["event_time"],
            "event_time_utc": utc(e["event_time"]),
            "summary": e.get("summary", ""),
            "classifier": classifier,
            "windows": e.get("source_windows") or [],
            "figures": ev,
        })
    return out


def identity_reference(case: Case) -> dict[str, Any]:
    """What a report carries in place of the identity when the identity travels beside it (the feed): a pointer to
    the feed message's `identity` field for a reportable case; for any other status, a note that none is sent
    (a U.S.-person run is monitored, not reported)."""
    out: dict[str, Any] = {"account_id": case.account_id, "cip_on_file": bool(case.identity.get("cip_on_file"))}
    if case.status in REPORTABLE_STATUSES:
        return {"ref": IDENTITY_REF, **out}
    return {"withheld": f"status {case.status} is not reportable: no identity is sent", **out}


def draft_report(case: Case, policy: Policy | None = None, *, identity: bool = True) -> dict[str, Any]:
    """The draft report of `case` as plain JSON-ready data. `policy` (or the shipped profile of the case's policy
    id) supplies the title, threshold and demo flag. `identity=False` puts `identity_reference` in place of the
    identity (the feed sends the identity once, beside the report)."""
    pol = _policy_for(case, policy)
    entries = _entries(case)
    demo = bool(pol.demo) if pol else case.policy_id == "demo"
    return {
        "draft": True,
        "banner": DRAFT_BANNER,
        "demo": demo,
        "demo_banner": DEMO_BANNER if demo else None,
        "title": f"Report of a transaction that may result in training a large AI model ({case.reason})",
        "case": {
            "case_id": case.case_id,
            "status": case.status,
            "version": case.version,
            "reason": case.reason,
            "account_id": case.account_id,
            "beneficial_owner_id": case.beneficial_owner_id,
            "run_id": case.run_id,
            "filing_reference": case.filing_reference,
        },
        "policy": {
            "id": case.policy_id,
            "version": case.policy_version,
            "title": pol.title if pol else None,
            "window_days": pol.reporting.window_days if pol else None,
            "day_kind": pol.reporting.day_kind if pol else None,
        },
        "foreign_person": identity_block(case) if identity else identity_reference(case),
        "training_run": _training_run(case, entries),
        "compute": _compute(entries, pol),
        "evidence": _evidence(entries),
        "dates": {
            "knowledge_at": case.knowledge_at,
            "knowledge_at_utc": utc(case.knowledge_at),
            "due_at": case.due_at,
            "due_at_utc": utc(case.due_at),
            "detected_at_utc": utc(case.detected_at),
            "clock_started": case.knowledge_at is not None,
        },
        "detectors": list(case.detectors),
        "suggested_inquiry": case.suggested_inquiry,
    }


def _v(x: Any) -> str:
    if x is None or x == [] or x == "":
        return "_not on file_"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _figure(key: str, x: Any) -> str:
    # Epoch times print as UTC, not as 1.772e+09.
    if isinstance(x, int | float) and not isinstance(x, bool) and key.endswith(_TIME_SUFFIXES):
        return utc(float(x)) or ""
    return _v(x)


def _identity_lines(fp: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lines += [
        f"- Name: {_v(fp['name'])}",
        f"- Address: {_v(fp['address'])}",
        f"- Means of payment: {_v(fp['payment_means'])}",
        f"- Source of payment: {_v(fp['payment_source'])}",
        f"- Email addresses: {_v(', '.join(fp['emails']))}",
        f"- Telephone numbers: {_v(', '.join(fp['phones']))}",
        "- IP addresses:" + ("" if fp["ip_addresses"] else " _not on file_"),
    ]
    lines += [f"  - {ip['ip']} ({ip.get('purpose', 'access')}) at {ip['accessed_at_utc']}" for ip in fp["ip_addresses"]]
    lines += [
        f"- Account: {fp['account_id']}; customer type {_v(fp['customer_type'])}; country {_v(fp['country'])}; "
        f"U.S. person: {_v(fp['us_person'])}; verification {_v(fp['verification_status'])}",
    ]
    if fp.get("subject_owner"):
        so = fp["subject_owner"]
        lines.append(f"- Beneficial owner this case is about: {_v(so.get('name'))} ({so.get('owner_id')}), "
                     f"nationality {_v(so.get('nationality'))}, residence {_v(so.get('residence'))}")
    for o in fp.get("beneficial_owners") or []:
        lines.append(f"- Beneficial owner: {_v(o.get('name'))} ({o.get('owner_id')}), {_v(o.get('ownership_pct'))} %"
                     f"{', control' if o.get('control') else ''}, nationality {_v(o.get('nationality'))}")
    if fp.get("reseller"):
        lines.append(f"- Reseller: {_v(fp['reseller'].get('name'))} ({_v(fp['reseller'].get('country'))})")
    if fp["missing"]:
        lines.append(f"- Missing from the CIP record: {', '.join(fp['missing'])}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown text of a draft report dict (from `draft_report`)."""
    c, p, fp, run, comp, d = (report[k] for k in ("case", "policy", "foreign_person", "training_run", "compute",
                                                    "dates"))
    lines = [f"> **{report['banner']}**"]
    if report["demo"]:
        lines.append(f"> **{report['demo_banner']}**")
    lines += [
        "",
        f"# {report['title']}",
        "",
        f"Case `{c['case_id']}` (status {c['status']}, version {c['version']}) · policy `{p['id']}` "
        f"version {p['version']}" + (f" — {p['title']}" if p["title"] else ""),
        "",
        "## Dates",
        f"- Knowledge (event time): {_v(d['knowledge_at_utc'])}",
        f"- Report due: {_v(d['due_at_utc'])}"
        + (f" ({_v(p['window_days'])} {p['day_kind']} days after knowledge)" if p["window_days"] else ""),
        f"- First recorded by the pipeline: {_v(d['detected_at_utc'])}",
        "",
        "## Identity of the foreign person",
    ]
    if "ref" in fp or "withheld" in fp:
        lines.append(f"- {fp.get('withheld') or 'In the message field `' + fp['ref'] + '` beside this report.'}")
    else:
        lines += _identity_lines(fp)
    lines += [
        "",
        "## The training run",
        run["description"],
        "",
        f"- Accelerators: {_v(', '.join(f'{n} x {m}' for m, n in sorted(run['accelerators'].items())))}",
        f"- Devices: {_v(run['device_count'])}; nodes: {_v(run['node_count'])}",
        f"- From {_v(run['start_utc'])} to {_v(run['end_utc'])}"
        + (f" ({run['duration_s'] / 3600:.1f} h)" if run["duration_s"] is not None else ""),
        f"- Workloads: {_v(', '.join(run['workloads']))}"
        + (f" (the first {len(run['workloads'])} of {run['workload_count']})"
           if run["workload_count"] > len(run["workloads"]) else ""),
        f"- Jobs: {_v(', '.join(map(str, run['jobs'])))}",
    ]
    if run["run_ids"]:
        lines.append(f"- Runs summed: {', '.join(run['run_ids'])}")
    lines += [
        "",
        "## Compute estimate",
        f"- Estimate: {_v(comp['estimate_flop'])} FLOP (band {_v(comp['band_low_flop'])} – "
        f"{_v(comp['band_high_flop'])}); basis: {comp['basis']}",
        f"- Projected total: {_v(comp['projected_flop'])} FLOP"
        + (f" (at {comp['rate_flops']:.4g} FLOP/s until {utc(comp['reserved_until'])})"
           if comp["rate_flops"] and comp["reserved_until"] and comp["projected_flop"] else "")
        + f"; policy threshold: {_v(comp['threshold_flop'])} FLOP",
        "",
        "## Evidence",
    ]
    for e in report["evidence"]:
        lines.append(f"- {e['event_time_utc']} **{e['detector']}** — {e['outcome']} ({e['reason']}): {e['summary']}")
        if e["classifier"]:
            lines.append(f"  - classifier: {e['classifier']}")
        if e["windows"]:
            lines.append(f"  - windows: {', '.join(e['windows'][:20])}" + (" …" if len(e["windows"]) > 20 else ""))
        figures = {k: v for k, v in e["figures"].items() if isinstance(v, int | float | str | bool)}
        if figures:
            lines.append("  - figures: " + "; ".join(f"{k} = {_figure(k, v)}" for k, v in sorted(figures.items())))
    if report.get("suggested_inquiry"):
        lines += ["", "## Suggested customer inquiry", report["suggested_inquiry"]]
    return "\n".join(lines) + "\n"
