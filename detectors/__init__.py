"""Pure decision logic: compute estimation, classification, thresholds, foreign-person tests. Imports schemas only."""
