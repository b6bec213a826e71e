"""Shared by the bench_* modules: a `__main__` that prints figures and, with --json, one JSON line for the harness."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from schemas.serde import dumps


def bench_main(run: Callable[..., dict], argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON line (used by benchmarks.run)")
    args = ap.parse_args(argv)
    result = run(quick=args.quick)
    if args.json:
        sys.stdout.write("\n" + dumps(result).decode() + "\n")
    else:
        for k, v in result["figures"].items():
            print(f"{k} = {v}")
        for note in result.get("notes", []):
            print(f"- {note}")
