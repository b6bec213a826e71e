-- Issue 13: PII out of dead_letters, the policy's foreign-person test in the owner view, window counts per
-- workload-window. Statements are idempotent (IF NOT EXISTS, OR REPLACE, re-runnable moves) so a crash mid-way is
-- safe to run again.

-- Raw bytes (and full detail) of letters from PII topics (CIP). Restricted like cip_identity: the analyst grant
-- does not include it. Keyed like dead_letters, by dead_letter_id.
CREATE TABLE IF NOT EXISTS dead_letter_payloads
(
    dead_letter_id String,
    topic LowCardinality(String),
    `partition` Int32,
    `offset` Int64,
    detail String,
    raw String,
    at Float64
)
ENGINE = ReplacingMergeTree
ORDER BY dead_letter_id;

-- dead_letters keeps provenance, reason and a fingerprint of every letter; `raw` is '' where raw_restricted.
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS raw_size UInt64 DEFAULT length(raw);
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS raw_blake2b String DEFAULT '';
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS raw_restricted Bool DEFAULT false;

-- Letters stored before this migration from the default CIP topic: copy to the restricted table, then blank.
INSERT INTO dead_letter_payloads (dead_letter_id, topic, `partition`, `offset`, detail, raw, at)
SELECT dead_letter_id, topic, `partition`, `offset`, detail, raw, at FROM dead_letters FINAL
WHERE topic = 'accounts.cip' AND NOT raw_restricted;

ALTER TABLE dead_letters UPDATE raw_size = length(raw), raw = '', raw_restricted = true
WHERE topic = 'accounts.cip' AND NOT raw_restricted SETTINGS mutations_sync = 2;

-- The owner's U.S.-person status (a flag, not identity) so that views can apply the foreign-person test.
-- Rows written before this migration read NULL (= unknown) until the account's CIP record is written again.
ALTER TABLE account_owners ADD COLUMN IF NOT EXISTS us_person Nullable(Bool);

-- The foreign-person test of each policy profile the store has seen (Store.register_policy; the shipped profiles
-- at every connect). all_in_scope = the profile's us_countries is empty (everyone is in scope).
CREATE TABLE IF NOT EXISTS policy_foreign_tests
(
    policy_id String,
    policy_version String,
    check_beneficial_owners Bool,
    owner_min_pct Float64,
    owner_control_counts Bool,
    unknown_is_foreign Bool,
    all_in_scope Bool,
    updated_us UInt64
)
ENGINE = ReplacingMergeTree(updated_us)
ORDER BY policy_id;

-- Estimated compute per account. Partials (partitions, source topics, late-data revisions) are distinct window_ids
-- that add up; FINAL keeps one row per window_id, so a re-delivered partial counts once. `windows` counts
-- distinct workload-windows, however many partials each has.
CREATE OR REPLACE VIEW compute_by_account AS
SELECT
    account_id,
    sum(flop) AS flop,
    sum(flop_low) AS flop_low,
    sum(flop_high) AS flop_high,
    sum(device_seconds) / 3600 AS device_hours,
    uniqExact(workload_id, window_start) AS windows,
    count() AS partials,
    uniqExact(workload_id) AS workloads,
    min(window_start) AS first_window_start,
    max(window_end) AS last_window_end
FROM windows FINAL
GROUP BY account_id;

-- Compute per foreign beneficial owner under each registered policy: owners that qualify (>= owner_min_pct, or
-- control where it counts) and are foreign (not a U.S. person; unknown where unknown_is_foreign; anyone where the
-- policy puts everyone in scope), summed over the accounts they currently own.
CREATE OR REPLACE VIEW compute_by_owner AS
SELECT
    p.policy_id AS policy_id,
    any(p.policy_version) AS policy_version,
    o.owner_id AS owner_id,
    count() AS accounts,
    max(o.ownership_pct) AS max_ownership_pct,
    max(o.control) AS controls_any,
    countIf(o.us_person IS NULL) > 0 AS us_person_unknown,
    sum(c.flop) AS flop,
    sum(c.flop_low) AS flop_low,
    sum(c.flop_high) AS flop_high,
    sum(c.device_hours) AS device_hours,
    any(oc.owner_cases) AS owner_cases,
    any(oc.reportable_owner_cases) AS reportable_owner_cases
FROM
(
    SELECT account_id, owner_id, ownership_pct, control, us_person
    FROM account_owners FINAL
    WHERE owner_id != ''
      AND (account_id, updated_us) IN (SELECT account_id, max(updated_us) FROM account_owners GROUP BY account_id)
) AS o
CROSS JOIN (SELECT * FROM policy_foreign_tests FINAL) AS p
LEFT JOIN compute_by_account AS c ON c.account_id = o.account_id
LEFT JOIN
(
    SELECT
        policy_id,
        assumeNotNull(beneficial_owner_id) AS owner_id,
        count() AS owner_cases,
        countIf(status IN ('open', 'needs_review', 'acknowledged', 'reported')) AS reportable_owner_cases
    FROM cases FINAL
    WHERE beneficial_owner_id IS NOT NULL
    GROUP BY policy_id, owner_id
) AS oc ON oc.owner_id = o.owner_id AND oc.policy_id = p.policy_id
WHERE p.check_beneficial_owners
  AND (ifNull(o.ownership_pct, -1) >= p.owner_min_pct OR (o.control AND p.owner_control_counts))
  AND (p.all_in_scope OR o.us_person = false OR (o.us_person IS NULL AND p.unknown_is_foreign))
GROUP BY p.policy_id, o.owner_id;
