"""A method for the runner's tests: it records every call (its RunContext) and leaves a
marker file `call<n>` in the run folder, so a test sees when and where it ran."""
from jaxprune.context import MethodResult
from jaxprune.report import Report

CALLS = []


def run(ctx) -> MethodResult:
    CALLS.append(ctx)
    (ctx.run_dir / f"call{len(CALLS)}").touch()
    return MethodResult({}, Report("probe", []))
