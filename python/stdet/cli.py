"""The `stdet` command line."""

import argparse
import sys


def _backends(_: argparse.Namespace) -> int:
    """Print which op backends run here, and why the others do not."""
    import stdet_kernels

    available = stdet_kernels.available_backends()
    reasons = stdet_kernels.unavailable_reasons()
    for name in stdet_kernels.BACKENDS:
        status = "available" if name in available else f"unavailable: {reasons.get(name, 'no device')}"
        print(f"{name:7s} {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    backends = commands.add_parser("backends", help="list the op backends this machine can run")
    backends.set_defaults(run=_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
