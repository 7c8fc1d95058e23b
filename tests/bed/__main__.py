"""``python -m tests.bed {demo,teardown,up}``: the demo, the clean-up of a kept bed, a bare bed."""

from __future__ import annotations

import argparse
import logging
import sys

from tests.bed import testbed as tb
from tests.bed.demo import demo, teardown


def main(argv: list[str] | None = None) -> int:
    """Parse the sub-command and run it; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tests.bed", description="igdpcp's namespace test bed")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build the namespace test bed and map a port through both NATs")
    d.add_argument("--keep", action="store_true", help="leave everything running for exploration")
    d.add_argument("--layout", choices=("router", "split"), default="router",
                   help="split: controld in its own namespace")
    t = sub.add_parser("teardown", help="remove a bed left by demo --keep")
    t.add_argument("prefix")
    sub.add_parser("up", help="build a bed with NAT2 and wait for Ctrl-C (testbed options follow)",
                   add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd == "up":
        return tb.main(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return demo(args.keep, args.layout) if args.cmd == "demo" else teardown(args.prefix)


if __name__ == "__main__":
    sys.exit(main())
