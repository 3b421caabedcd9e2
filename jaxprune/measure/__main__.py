"""`python -m jaxprune.measure SPEC.json`: rerun a saved measurement and print its table.

SPEC.json is what `jaxprune.measure.measure(..., save=...)` wrote (run folders keep theirs
next to the figures they produced, e.g. `<run>/latency/spec.json`)."""
from __future__ import annotations

import argparse
import json
import sys

from jaxprune.measure import load_spec, measure
from jaxprune.report import table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxprune.measure", description=__doc__)
    p.add_argument("spec", help="a spec.json written by jaxprune.measure.measure(save=...)")
    p.add_argument("--rounds", type=int, help="override the saved number of rounds")
    p.add_argument("--bursts", type=int, help="override the saved number of bursts a round")
    args = p.parse_args(argv)
    workloads, settings = load_spec(args.spec)
    for key in ("rounds", "bursts"):
        if getattr(args, key):
            settings[key] = getattr(args, key)
    t = measure(workloads, **settings)
    rows = [[w.name, w.runtime, f"{t[w.name].median_ms:.3f}",
             f"{t[w.name].spread_ms[0]:.3f} – {t[w.name].spread_ms[1]:.3f}", t[w.name].threads,
             t[w.name].device] for w in workloads]
    print("\n".join(table(["workload", "runtime", "median ms", "spread (min – max of bursts)",
                           "threads / devices", "device"], rows)))
    print(json.dumps(t.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
