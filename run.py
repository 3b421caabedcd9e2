"""jaxprune command line: run one experiment described by a YAML config.

    python run.py                                   # configs/demo.yaml
    python run.py --config configs/x.yaml --set train.epochs=2 method.max_rounds=3
    python run.py --config configs/x.yaml --dry-run # print the resolved config and the plan
    python run.py --config configs/x.yaml --out /scratch/runs
    python run.py --resume runs/demo                 # continue a run from its own config.yaml
    python run.py --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # one per host

Results go to <out>/<name>/ (config.yaml, results.json, report, checkpoints).
Running the same command again (or --resume <out>/<name>) continues from the last epoch
checkpoint in that folder; a changed config is refused.
A multi-process run (the flags above, or a detected Slurm / TPU pod / Open MPI launch)
shares one run folder, which process 0 writes: put it on a file system all hosts see.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def _one_xla_device_per_core() -> None:
    """One XLA host device per CPU core: a single CPU device keeps only one core busy
    (DESIGN.md §2), and data parallelism over host devices uses them all. Must run
    before jax is imported; harmless on GPU/TPU, where the host platform is unused."""
    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags:  # the user's own setting wins
        os.environ["XLA_FLAGS"] = f"{flags} {flag}={os.cpu_count() or 1}".strip()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="Make a trained classifier shallower: run one experiment from a YAML config.",
        epilog="Errors in the config or the inputs print one line and exit with status 2.")
    p.add_argument("--config", type=Path,
                   help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--resume", type=Path, metavar="RUN_FOLDER",
                   help="continue the run in RUN_FOLDER with the config saved there "
                        "(instead of --config/--set/--out)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE",
                   help="override config keys, each value read as YAML (one or more pairs, "
                        "repeatable), e.g. --set train.epochs=2 model.options.width=16")
    p.add_argument("--out", help="parent folder of the run folder (overrides the config's 'out')")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check a run starts with, print the resolved config and the "
                        "plan (with any input not on disk yet); read no data, train nothing, "
                        "write nothing")
    dist = p.add_argument_group(
        "multi-process runs", "all three flags, the same coordinator and count on every process; "
        "without them a Slurm, TPU pod or Open MPI launch is detected from its environment")
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0, which listens on PORT")
    dist.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    return p


def _resolve(args):
    """The run's config: --resume's saved config.yaml, else --config with --set and --out."""
    import dataclasses

    from jaxprune import config, runner
    from jaxprune.errors import UserError
    if args.resume is None:
        cfg = config.load(args.config or DEFAULT_CONFIG, args.overrides)
        return cfg if args.out is None else dataclasses.replace(cfg, out=args.out)
    if args.config or args.overrides or args.out:
        raise UserError("--resume takes the config saved in the run folder; leave out "
                        "--config, --set and --out")
    saved = args.resume / runner.CONFIG_FILE
    if not saved.is_file():
        raise UserError(f"--resume {args.resume}: no {saved}; give the folder of an earlier run "
                        f"(<out>/<name>)")
    cfg = config.load(saved)
    # the folder may have moved since: it is where the run continues (resolved, so that
    # `--resume .` has a name too)
    folder = args.resume.resolve()
    return dataclasses.replace(cfg, out=str(folder.parent), name=folder.name)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _one_xla_device_per_core()
    from jaxprune import config, distributed, runner
    from jaxprune.errors import UserError
    try:
        if not args.dry_run:  # a dry run reads and writes nothing: it joins no run either
            joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            if joined:
                print(f"multi-process run: {joined}", file=sys.stderr, flush=True)
        cfg = _resolve(args)
        if args.dry_run:
            print("# resolved config")
            print(config.dump(cfg))
            print("# plan")
            print(runner.plan(cfg))
            return 0
        run_dir, _ = runner.run(cfg)
        print(f"run folder: {run_dir}")
        return 0
    except UserError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
