-- Customer identification. cip_identity is the PII: the full CIP record, in a table of its own so a server can
-- grant analysts everything else and leave this out. account_owners is its non-PII projection (who owns which
-- account, how much, with control or not), which the owner-level views need.
-- updated_us = round(updated_at * 1e6) is the ReplacingMergeTree version (Float64 cannot be one).

CREATE TABLE IF NOT EXISTS cip_identity
(
    account_id String,
    updated_at Float64,
    updated_us UInt64,
    record String
)
ENGINE = ReplacingMergeTree(updated_us)
ORDER BY account_id;

-- One row per (account, owner) of each CIP record; a record without owners writes one row with owner_id = ''
-- so that "the latest record has no owners" is visible. Current owners of an account = its rows carrying the
-- account's highest updated_us (older records' owners that were since removed are thereby excluded).
CREATE TABLE IF NOT EXISTS account_owners
(
    account_id String,
    owner_id String,
    ownership_pct Nullable(Float64),
    control Bool,
    updated_at Float64,
    updated_us UInt64
)
ENGINE = ReplacingMergeTree(updated_us)
ORDER BY (account_id, owner_id);
