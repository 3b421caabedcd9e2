"""python -m jaxprune.data {prepare,info} NAME [--root DIR] [--archive FILE]"""
from __future__ import annotations

import argparse
import sys

from jaxprune.data import available, describe, prepare
from jaxprune.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxprune.data",
                                     description="Prepare or inspect the data sets jaxprune reads.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (("prepare", "download and lay out a data set once"),
                          ("info", "check a data set and print its classes and split sizes")):
        p = sub.add_parser(command, help=text)
        p.add_argument("name", help="one of: " + ", ".join(available()))
        p.add_argument("--root", help="folder holding the data sets (not needed for digits)")
        if command == "prepare":
            p.add_argument("--archive", help="a downloaded archive (file or URL) to unpack instead of "
                                             "the default download")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare(args.name, args.root, args.archive))
        else:
            info = describe(args.name, args.root)
            print(f"{info.name}: {info.num_classes} classes, {info.image_size[0]}x{info.image_size[1]} px, "
                  + ", ".join(f"{k} {v}" for k, v in info.splits.items()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
