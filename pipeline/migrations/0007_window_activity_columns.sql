-- Issue 17: the window row follows the window layout (schemas/window_sums.py) where analysts query it. The activity
-- figures they filter and plot on, as columns computed at insert from the additive `sums` (so every partial and
-- late-data revision has them, and partials combine exactly: weight each mean by its seconds), beside `flop`,
-- `flop_low`, `flop_high` and `basis`, which were columns already. Additive only: MATERIALIZED columns are never
-- inserted by the pipeline (SELECT * leaves them out); rows stored before this file get them computed on read.
-- Means are time-weighted over the seconds the field covered (`<stat>.sum` / `<stat>.n`); NULL where it never did.
-- tests/test_store_windows_columns.py checks every `sums` key below is in the layout.

ALTER TABLE windows ADD COLUMN IF NOT EXISTS tensor_active_mean Nullable(Float64)
    MATERIALIZED if(sums['tensor_active.n'] > 0, sums['tensor_active.sum'] / sums['tensor_active.n'], NULL);
ALTER TABLE windows ADD COLUMN IF NOT EXISTS tensor_active_seconds Float64 MATERIALIZED sums['tensor_active.n'];
ALTER TABLE windows ADD COLUMN IF NOT EXISTS gpu_util_mean Nullable(Float64)
    MATERIALIZED if(sums['util_frac.n'] > 0, sums['util_frac.sum'] / sums['util_frac.n'], NULL);
ALTER TABLE windows ADD COLUMN IF NOT EXISTS gpu_util_seconds Float64 MATERIALIZED sums['util_frac.n'];
ALTER TABLE windows ADD COLUMN IF NOT EXISTS power_w_mean Nullable(Float64)
    MATERIALIZED if(sums['power_w.n'] > 0, sums['power_w.sum'] / sums['power_w.n'], NULL);
ALTER TABLE windows ADD COLUMN IF NOT EXISTS power_w_seconds Float64 MATERIALIZED sums['power_w.n'];
ALTER TABLE windows ADD COLUMN IF NOT EXISTS power_tdp_share_mean Nullable(Float64)
    MATERIALIZED if(sums['power_frac.n'] > 0, sums['power_frac.sum'] / sums['power_frac.n'], NULL);
