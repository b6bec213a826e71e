-- Analyst views (documented in docs/store.md). Each shows latest state: FINAL on ReplacingMergeTree tables,
-- window corrections are additive rows. Views never select PII (cases.identity, cip_identity).

-- Reportable cases whose report is not yet filed, soonest deadline first (no due date yet: last).
CREATE VIEW IF NOT EXISTS open_cases_by_due AS
SELECT
    case_id, account_id, beneficial_owner_id, run_id, policy_id, policy_version, reason, status,
    knowledge_at, due_at, toDateTime64(due_at, 3, 'UTC') AS due_at_utc, detected_at, updated_at, detectors, version
FROM cases FINAL
WHERE status IN ('open', 'needs_review', 'acknowledged')
ORDER BY due_at ASC NULLS LAST, case_id ASC;

-- Estimated compute per account. A late-data correction (revision n > 0) carries only the late samples'
-- additive contribution under its own window_id (docs/ingest.md), so every distinct window row is summed.
CREATE VIEW IF NOT EXISTS compute_by_account AS
SELECT
    account_id,
    sum(flop) AS flop,
    sum(flop_low) AS flop_low,
    sum(flop_high) AS flop_high,
    sum(device_seconds) / 3600 AS device_hours,
    uniqExact(workload_id, `partition`, window_start) AS windows,
    uniqExact(workload_id) AS workloads,
    min(window_start) AS first_window_start,
    max(window_end) AS last_window_end
FROM windows FINAL
GROUP BY account_id;

-- Estimated compute per beneficial owner over the accounts it currently owns (any stake; filter on
-- max_ownership_pct / controls_any for a policy's owner_min_pct), with the owner-level cases opened for it.
CREATE VIEW IF NOT EXISTS compute_by_owner AS
SELECT
    o.owner_id AS owner_id,
    count() AS accounts,
    max(o.ownership_pct) AS max_ownership_pct,
    max(o.control) AS controls_any,
    sum(c.flop) AS flop,
    sum(c.flop_low) AS flop_low,
    sum(c.flop_high) AS flop_high,
    sum(c.device_hours) AS device_hours,
    any(oc.owner_cases) AS owner_cases,
    any(oc.reportable_owner_cases) AS reportable_owner_cases
FROM
(
    SELECT account_id, owner_id, ownership_pct, control
    FROM account_owners FINAL
    WHERE owner_id != ''
      AND (account_id, updated_us) IN (SELECT account_id, max(updated_us) FROM account_owners GROUP BY account_id)
) AS o
LEFT JOIN compute_by_account AS c ON c.account_id = o.account_id
LEFT JOIN
(
    SELECT
        assumeNotNull(beneficial_owner_id) AS owner_id,
        count() AS owner_cases,
        countIf(status IN ('open', 'needs_review', 'acknowledged', 'reported')) AS reportable_owner_cases
    FROM cases FINAL
    WHERE beneficial_owner_id IS NOT NULL
    GROUP BY owner_id
) AS oc ON oc.owner_id = o.owner_id
GROUP BY o.owner_id;

-- Findings per detector id, version and outcome.
CREATE VIEW IF NOT EXISTS detections_by_detector AS
SELECT
    detector_id,
    detector_version,
    outcome,
    count() AS detections,
    uniqExact(account_id) AS accounts,
    min(event_time) AS first_event_time,
    max(event_time) AS last_event_time
FROM detections FINAL
GROUP BY detector_id, detector_version, outcome;
