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


def _nqm(args: argparse.Namespace) -> int:
    """Closed form against simulation on the noisy quadratic model, and a plot of variance against alpha."""
    from pathlib import Path

    from stdet import nqm

    try:
        h, c = nqm.spectrum(args.dims, args.h_min, args.h_max)
        print(nqm.report(args.lr, h, c, args.alpha, args.every, args.replicas, args.seed))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        nqm.plot(out, args.lr, h, c)
    except ValueError as error:
        print(f"stdet nqm: {error}", file=sys.stderr)
        return 2
    print(f"plot: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    backends = commands.add_parser("backends", help="list the op backends this machine can run")
    backends.set_defaults(run=_backends)
    nqm = commands.add_parser(
        "nqm", help="noisy quadratic model: SGD and SMA variance, closed form and simulated"
    )
    nqm.add_argument("--lr", type=float, default=0.5)
    nqm.add_argument("--dims", type=int, default=20, help="number of curvatures")
    nqm.add_argument("--h-min", type=float, default=0.1)
    nqm.add_argument("--h-max", type=float, default=1.0)
    nqm.add_argument("--alpha", type=float, default=0.1)
    nqm.add_argument("--every", type=int, default=10, help="SMA samples every this many steps")
    nqm.add_argument("--replicas", type=int, default=4000, help="independent simulated chains")
    nqm.add_argument("--seed", type=int, default=0)
    nqm.add_argument("--out", default="runs/nqm/nqm.png", help="where to save the plot")
    nqm.set_defaults(run=_nqm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
