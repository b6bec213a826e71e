-- Issue 16: shadow-policy cases (status 'shadow', pipeline/policy_ops.py) are no one's cases: the owner view's case
-- counts leave them out. The view as in 0004, with that one filter added.
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
    WHERE beneficial_owner_id IS NOT NULL AND status != 'shadow'
    GROUP BY policy_id, owner_id
) AS oc ON oc.owner_id = o.owner_id AND oc.policy_id = p.policy_id
WHERE p.check_beneficial_owners
  AND (ifNull(o.ownership_pct, -1) >= p.owner_min_pct OR (o.control AND p.owner_control_counts))
  AND (p.all_in_scope OR o.us_person = false OR (o.us_person IS NULL AND p.unknown_is_foreign))
GROUP BY p.policy_id, o.owner_id;
