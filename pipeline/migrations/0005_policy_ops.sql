-- Issue 16: policy operations. Suppressions with their audit trail and the findings they held, analyst labels.
-- Additive only; every statement is IF NOT EXISTS so a half-applied file runs again safely.

-- One logical row per suppression, the highest `version` wins (an early end is a new version).
CREATE TABLE IF NOT EXISTS suppressions
(
    suppression_id String,
    scope LowCardinality(String),
    subject String,
    detector_id Nullable(String),
    reason String,
    created_by String,
    created_at Float64,
    starts_at Float64,
    expires_at Float64,
    ended_at Nullable(Float64),
    ended_by Nullable(String),
    end_reason Nullable(String),
    version UInt64,
    schema_version UInt8
)
ENGINE = ReplacingMergeTree(version)
ORDER BY suppression_id;

-- Append-only audit of suppressions (added, ended, held, released), deduplicated by event_id like case_events.
CREATE TABLE IF NOT EXISTS suppression_events
(
    event_id String,
    suppression_id String,
    at Float64,
    recorded_at Float64,
    actor LowCardinality(String),
    action LowCardinality(String),
    details String,
    schema_version UInt8
)
ENGINE = ReplacingMergeTree
ORDER BY (suppression_id, at, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- A finding a suppression held back, the finding itself as JSON (the version it held), and whether it was
-- released when the suppression ended: state 0 = held, 1 = released; the higher state wins, so a replayed hold
-- never undoes a release.
CREATE TABLE IF NOT EXISTS suppression_hits
(
    suppression_id String,
    fingerprint String,
    detection_id String,
    case_id String,
    account_id String,
    event_time Float64,
    recorded_at Float64,
    detection String,
    state UInt8,
    released_at Nullable(Float64)
)
ENGINE = ReplacingMergeTree(state)
ORDER BY (suppression_id, fingerprint);

-- The analyst's verdict on a closed case (true_positive / false_positive + reason code); the latest wins.
CREATE TABLE IF NOT EXISTS case_labels
(
    case_id String,
    label LowCardinality(String),
    reason_code LowCardinality(String),
    actor String,
    at Float64,
    recorded_at Float64,
    policy_id LowCardinality(String),
    account_id String,
    run_id Nullable(String),
    detectors Array(String),
    bands Array(String),
    workload_ids Array(String),
    schema_version UInt8
)
ENGINE = ReplacingMergeTree(recorded_at)
ORDER BY case_id;
