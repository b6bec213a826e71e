-- Core sinks. Every table is keyed by a deterministic id so replays and retries upsert instead of duplicating;
-- readers use FINAL (or argMax) to see one row per key before background merges have run.
-- Epoch times are Float64 seconds, exactly as the pydantic models carry them, so reads round-trip bit for bit.
-- Statements are split on ';' at the end of a line: keep semicolons out of string literals and comments.

-- Partial window aggregates (one ingest partition's view of one workload in one event-time window).
-- window_id = hash(workload, window_start, partition, revision): a late-data correction is a new row with a
-- higher revision holding only the late samples' contribution; views add all distinct rows.
CREATE TABLE IF NOT EXISTS windows
(
    window_id String,
    workload_id String,
    account_id Nullable(String),
    job_id Nullable(String),
    run_label Nullable(String),
    `partition` UInt32,
    revision UInt32,
    window_start Float64,
    window_end Float64,
    sample_count UInt64,
    device_count UInt32,
    node_count UInt32,
    devices Array(String),
    nodes Array(String),
    device_seconds Float64,
    flop Float64,
    flop_low Float64,
    flop_high Float64,
    basis LowCardinality(String),
    accelerators Map(String, UInt32),
    unknown_accelerators Array(String),
    sums Map(String, Float64),
    features Map(String, Nullable(Float64)),
    missing_fields Array(String),
    offsets Map(String, Array(Int64)),
    schema_version UInt8
)
ENGINE = ReplacingMergeTree
ORDER BY window_id;

-- Detector findings; evidence is the detector's JSON evidence object.
CREATE TABLE IF NOT EXISTS detections
(
    detection_id String,
    detector_id LowCardinality(String),
    detector_version UInt32,
    severity LowCardinality(String),
    policy_id LowCardinality(String),
    policy_version String,
    outcome LowCardinality(String),
    reason LowCardinality(String),
    account_id String,
    beneficial_owner_id Nullable(String),
    run_id Nullable(String),
    workload_ids Array(String),
    event_time Float64,
    summary String,
    evidence String,
    source_windows Array(String),
    schema_version UInt8
)
ENGINE = ReplacingMergeTree
ORDER BY detection_id;

-- The knowledge store: one logical row per case, the highest `version` wins.
-- `identity` holds the foreign person's identity for the report (PII): servers grant analysts a column list
-- without it (see grants_server.sql.example).
CREATE TABLE IF NOT EXISTS cases
(
    case_id String,
    account_id String,
    beneficial_owner_id Nullable(String),
    run_id Nullable(String),
    policy_id LowCardinality(String),
    policy_version String,
    reason LowCardinality(String),
    status LowCardinality(String),
    knowledge_at Nullable(Float64),
    detected_at Float64,
    due_at Nullable(Float64),
    updated_at Float64,
    detectors Array(String),
    evidence String,
    identity String,
    suggested_inquiry Nullable(String),
    filing_reference Nullable(String),
    dismiss_reason Nullable(String),
    version UInt64,
    schema_version UInt8
)
ENGINE = ReplacingMergeTree(version)
ORDER BY case_id;

-- Append-only audit trail of a case. event_id = hash(case id, action, event time), so (case_id, at) are fixed by
-- event_id and the sorting key below dedups exactly by event_id while keeping one case's events together.
-- The deduplication window additionally turns a retried identical insert into a no-op at insert time.
CREATE TABLE IF NOT EXISTS case_events
(
    event_id String,
    case_id String,
    at Float64,
    recorded_at Float64,
    actor LowCardinality(String),
    action LowCardinality(String),
    from_status LowCardinality(Nullable(String)),
    to_status LowCardinality(Nullable(String)),
    details String,
    schema_version UInt8
)
ENGINE = ReplacingMergeTree
ORDER BY (case_id, at, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- Messages that could not be processed. offset = -1 when unknown; dead_letter_id = hash(topic, partition,
-- offset, raw) makes a replayed dead letter land on the same row.
CREATE TABLE IF NOT EXISTS dead_letters
(
    dead_letter_id String,
    reason LowCardinality(String),
    detail String,
    topic LowCardinality(String),
    `partition` Int32,
    `offset` Int64,
    raw String,
    at Float64
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, `partition`, `offset`, dead_letter_id);
