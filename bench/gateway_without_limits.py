"""A reference for `make bench`: the gateway without the stages of the limits.

The same gateway (`python -m gateway serve ...`, same arguments) with the three
stages of issue 13 taken out of its request path: `concurrency_cap`,
`storage_quota` and `bandwidth`. `make bench` runs the same restic backups
through it and through the gateway as it is (started by this script too, with
`--with-limits`, so that the two processes differ in nothing else, their past
included), and compares the gateway processes' CPU: the difference is what those
checks cost with no limit set.

    python bench/gateway_without_limits.py serve --listen ... (as `rclone-gateway serve`)
    python bench/gateway_without_limits.py --with-limits serve ...   # the gateway as it is
"""

from __future__ import annotations

import sys

from gateway.pipeline import handler, stages

LIMIT_STAGES = ("concurrency_cap", "storage_quota", "bandwidth")


def without_limits() -> tuple[stages.Stage, ...]:
    kept = tuple(s for s in stages.STAGES if s.__name__ not in LIMIT_STAGES)
    missing = set(LIMIT_STAGES) - {s.__name__ for s in stages.STAGES}
    if missing or len(kept) != len(stages.STAGES) - len(LIMIT_STAGES):
        raise SystemExit(f"gateway_without_limits: no stage named {sorted(missing)} in STAGES")
    return kept


def patch() -> tuple[stages.Stage, ...]:
    # `Pipeline(services, stages=STAGES)` took the tuple as its default when the class
    # was defined: replacing the module's name alone would not reach it.
    defaults = handler.Pipeline.__init__.__defaults__
    if defaults != (stages.STAGES,):
        raise SystemExit("gateway_without_limits: Pipeline.__init__ does not default to STAGES")
    kept = without_limits()
    stages.STAGES = kept
    handler.Pipeline.__init__.__defaults__ = (kept,)
    return kept


if __name__ == "__main__":
    # `--with-limits` first: the gateway as it is, started the same way (its twin in the
    # comparison, with the same history: none)
    if sys.argv[1:2] == ["--with-limits"]:
        del sys.argv[1]
    else:
        patch()
    from gateway.cli import main

    sys.exit(main())
