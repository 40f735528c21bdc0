"""The `stdet` command line: `train`, `eval`, `rd`, `demo`, `backends`, `nqm`.

Mistakes in the input (a missing folder, an unknown architecture, a checkpoint that does not fit)
end the command with one line on stderr and exit status 2; set STDET_DEBUG=1 for the traceback.
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

import tomllib

# Raised at import by CompressAI's use of torch.jit.script; not the user's concern.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


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
    from stdet import nqm

    h, c = nqm.spectrum(args.dims, args.h_min, args.h_max)
    print(nqm.report(args.lr, h, c, args.alpha, args.every, args.replicas, args.seed))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nqm.plot(out, args.lr, h, c)
    print(f"plot: {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# train

_TRAIN_SKIP = {"command", "run", "config", "resume"}


def _sma_alpha(text: str) -> float | str:
    return text if text == "uniform" else float(text)


def resolve_train_config(args: argparse.Namespace):
    """Defaults < the checkpoint's configuration (with --resume) < --config TOML < flags given."""
    from stdet.train import TrainConfig, load_checkpoint

    from_file: dict = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: {path} does not exist")
        try:
            from_file = {key.replace("-", "_"): v for key, v in tomllib.loads(path.read_text()).items()}
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"--config: {path} is not valid TOML ({error})") from None
    given = {key: value for key, value in vars(args).items() if key not in _TRAIN_SKIP}
    values: dict = {}
    resume = None
    if args.resume is not None:
        out = Path(given.get("out") or from_file.get("out") or TrainConfig.out)
        resume = Path(args.resume) if args.resume else out / "last.ckpt"
        values.update(load_checkpoint(resume)["config"])
    values.update(from_file)
    values.update(given)
    return TrainConfig.from_dict(values), resume


def _train(args: argparse.Namespace) -> int:
    from stdet.train import train

    config, resume = resolve_train_config(args)
    summary = train(config, resume)
    if int(os.environ.get("RANK", "0")) == 0:
        final, nan = summary["final_eval"] or {}, float("nan")
        print(
            f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s; "
            f"eval bpp {final.get('bpp', nan):.4f}, PSNR {final.get('psnr', nan):.2f} dB, "
            f"RD loss {final.get('rd_loss', nan):.4f}; "
            f"trainable {summary['trainable_fraction_end']:.0%}; files in {config.out}"
        )
    return 0


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag defaults to "not given" (SUPPRESS) so that --config and --resume can fill it."""
    add = parser.add_argument
    s = argparse.SUPPRESS
    add("--config", default=None, help="TOML file holding any of these settings (flags given win)")
    add(
        "--resume",
        nargs="?",
        const="",
        default=None,
        help="continue from a checkpoint (default: OUT/last.ckpt)",
    )
    add("--arch", default=s, help="CompressAI zoo architecture (default bmshj2018-factorized)")
    add("--N", type=int, default=s, help="channels N (default: the zoo's for --quality)")
    add("--M", type=int, default=s, help="channels M (default: the zoo's for --quality)")
    add("--quality", type=int, default=s, help="1..8: channel counts and default lambda (default 3)")
    add(
        "--lmbda",
        type=float,
        default=s,
        help="rate-distortion trade-off (default: CompressAI's for --quality)",
    )
    add("--metric", default=s, help="mse or ms-ssim")
    add("--method", default=s, help="adam (plain training) or stdet")
    add("--steps", type=int, default=s, help="training steps in all (default 1000)")
    add("--batch-size", type=int, default=s, help="global batch size (default 16)")
    add("--patch-size", type=int, default=s, help="random crop size (default 256)")
    add("--lr", type=float, default=s, help="learning rate (default 1e-4)")
    add(
        "--lr-schedule",
        default=s,
        help="constant (default), cosine (decays to 0 at --steps), step (x --lr-gamma at each of "
        "--lr-milestones) or plateau (CompressAI's ReduceLROnPlateau on the eval RD loss)",
    )
    add(
        "--lr-milestones",
        type=float,
        nargs="+",
        default=s,
        help="steps of the step schedule: fractions of --steps (< 1) or step numbers (default 0.85)",
    )
    add("--lr-gamma", type=float, default=s, help="factor of each decay, step and plateau (default 0.1)")
    add("--lr-patience", type=int, default=s, help="plateau: evaluations without progress (default 10)")
    add(
        "--init",
        default=s,
        help="start from this trained model (any checkpoint stdet export reads; fresh optimizers)",
    )
    add("--aux-lr", type=float, default=s, help="learning rate of the quantiles (default 1e-3)")
    add("--clip", type=float, default=s, help="max gradient norm, 0 = off (default 1.0)")
    add("--data", default=s, help="folder of PNG/JPEG training images (default: the bundled photos)")
    add("--eval-data", default=s, help="folder of PNG/JPEG eval images (default: the bundled photos)")
    add(
        "--probe-data",
        default=s,
        help="folder of held-out PNG/JPEG images for the probe batch that STDET's plateau test and the "
        "SMA guard judge on (default: training crops no batch uses)",
    )
    add(
        "--eval-every",
        type=int,
        default=s,
        help="steps between evaluations, 0 = at the end only (default 100)",
    )
    add(
        "--eval-live",
        action="store_true",
        default=s,
        help="with shadow SMA, evaluate the live weights too (the eval records' live)",
    )
    add("--log-every", type=int, default=s, help="steps between log records (default 10)")
    add("--checkpoint-every", type=int, default=s, help="steps between checkpoints (default 100)")
    add("--out", default=s, help="output folder (default runs/train)")
    add("--seed", type=int, default=s, help="seed of the initialisation and the data order (default 0)")
    add("--device", default=s, help="cpu or cuda (default cpu)")
    add("--no-progress", dest="progress", action="store_false", default=s, help="no progress bar")
    stdet = parser.add_argument_group("STDET and SMA (see stdet.STDETConfig)")
    add = stdet.add_argument
    add("--warmup-steps", type=int, default=s)
    add("--snapshots", type=int, default=s)
    add("--modes", type=int, default=s)
    add("--samples", type=int, default=s)
    add("--embed-every", type=int, default=s)
    add("--embed-rate", type=float, default=s)
    add("--max-embedded", type=float, default=s)
    add("--protect", type=float, default=s)
    add("--min-r2", type=float, default=s)
    add("--safety-window", type=int, default=s)
    add("--safety-tolerance", type=float, default=s)
    add("--safety-sigmas", type=float, default=s)
    add("--max-drift", type=float, default=s)
    add("--sensitivity", default=s, help="taylor (|g w|) or fisher (g^2): which elements stay free")
    add(
        "--jump",
        dest="continuity",
        action="store_false",
        default=s,
        help="embed an element at its fitted line (CMD) instead of keeping its value",
    )
    add(
        "--ref-grad",
        choices=("full", "own"),
        default=s,
        help="full: a reference gets its mode's whole reparametrized gradient (the default); own: only "
        "its own element's (CMD)",
    )
    add(
        "--release",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="at the lr's drop every embedded element returns to FREE and embedding ends",
    )
    add(
        "--sma-restart",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="with --release: the SMA average restarts there",
    )
    add(
        "--start",
        default=s,
        help="warmup: embed from the end of the warm-up; plateau: also wait until the probe loss is flat",
    )
    add("--plateau-window", type=int, default=s, help="steps the plateau test looks back (default: warm-up)")
    add("--plateau-tolerance", type=float, default=s, help="relative change that counts as flat (0.01)")
    add("--plateau-sigmas", type=float, default=s, help="standard errors added to the change (1)")
    add(
        "--accelerate-every",
        type=int,
        default=s,
        help="every this many steps after the warm-up, extrapolate the references along their fitted "
        "lines, kept only if a fixed probe batch's loss drops (0 = off, the default)",
    )
    add(
        "--accelerate-horizon",
        type=float,
        default=s,
        help="steps ahead the references are extrapolated (default: --accelerate-every)",
    )
    add(
        "--accelerate-free-r2",
        type=float,
        default=s,
        help="also move the FREE elements whose fit on their reference has R^2 >= this, by a times "
        "its move (default: the references alone)",
    )
    add("--sma-every", type=int, default=s, help="0 = no SMA")
    add("--sma-alpha", type=_sma_alpha, default=s, help="a number in (0, 1] or 'uniform'")
    add("--sma-mode", default=s, help="shadow or feedback")
    add(
        "--sma-guard",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="with shadow SMA, hand out (evaluate, export) the average only where the probe batch's "
        "per-crop losses are lower with it than with the live weights by more than "
        "--sma-guard-sigmas standard errors (default: on for stdet, off for adam)",
    )
    add(
        "--sma-guard-sigmas",
        type=float,
        default=s,
        help="the SMA guard's evidence: standard errors of the paired per-crop differences the "
        "average must win by (default 2; 0: wherever its mean probe loss is not higher)",
    )


# ----------------------------------------------------------------------------------------------
# eval and rd


def _eval(args: argparse.Namespace) -> int:

    from stdet.data import bundled_images, load_folder
    from stdet.evaluate import evaluate, write_results
    from stdet.export import ExportError, read_plain_state_dict
    from stdet.train import TrainingError, load_model, resolved_lmbda

    try:  # any checkpoint `stdet export` reads: the SMA averages where saved
        state, _ = read_plain_state_dict(args.checkpoint)
    except ExportError as error:
        raise TrainingError(f"--checkpoint: {error}") from None
    model = load_model(args.arch, state).to(args.device).eval()
    images = bundled_images("eval") if args.data is None else load_folder(args.data).images
    result = evaluate(model, images, args.metric, resolved_lmbda(args.metric, args.quality, args.lmbda))
    for name, record in [*result["images"].items(), ("mean", result["mean"])]:
        print(
            f"{Path(name).name:24s} bpp {record['bpp']:.4f} (estimated {record['estimated_bpp']:.4f})  "
            f"PSNR {record['psnr']:6.2f}  MS-SSIM {record['ms_ssim']:.4f}  "
            f"enc {record['encode_s'] * 1e3:7.1f} ms  dec {record['decode_s'] * 1e3:7.1f} ms"
        )
    if args.out is not None:
        json_path, csv_path = write_results(result, Path(args.out))
        print(f"results: {json_path}, {csv_path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Any checkpoint with STDET in it as a plain CompressAI checkpoint ({"state_dict": ...})."""
    from stdet.export import ExportError, export_checkpoint

    try:
        plain = export_checkpoint(args.checkpoint, args.out, raw=args.raw, arch=args.arch)
    except ExportError as error:
        raise ValueError(str(error)) from None
    print(f"{args.out}: {len(plain)} tensors, {'live weights' if args.raw else 'averages where saved'}")
    return 0


def _rd(args: argparse.Namespace) -> int:
    import json

    from stdet.evaluate import bd_psnr, bd_rate, load_points, plot_rd

    curves = {}
    for spec in args.curve:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise ValueError(f"--curve: expected NAME=eval.json,eval.json,..., got {spec!r}")
        curves[name] = load_points(paths.split(","), args.quality)
    anchor_name, anchor = next(iter(curves.items()))
    results = {"anchor": anchor_name, "quality": args.quality, "curves": {}}
    for name, curve in curves.items():
        entry = {"bpp": curve[0], args.quality: curve[1]}
        if name != anchor_name:
            entry["bd_rate_percent"] = bd_rate(anchor, curve)
            entry["bd_quality"] = bd_psnr(anchor, curve)
            print(
                f"{name} against {anchor_name}: BD-rate {entry['bd_rate_percent']:+.2f}%, "
                f"BD-{args.quality} {entry['bd_quality']:+.3f}"
            )
        results["curves"][name] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rd.json").write_text(json.dumps(results, indent=2) + "\n")
    label = "PSNR (dB)" if args.quality == "psnr" else "MS-SSIM"
    plot_rd(curves, out / "rd.png", label)
    print(f"results: {out / 'rd.json'}, plot: {out / 'rd.png'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stdet.demo import make_pretrained, run_demo

    if args.make_pretrained:
        make_pretrained(Path(args.out))
    else:
        run_demo(Path(args.out), steps=args.steps, quick=args.quick)
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stdet", description="Faster training of learned image compression."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a CompressAI model with plain Adam or STDET")
    _add_train_flags(train)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a model.pth with real entropy coding")
    evaluate.add_argument("--arch", required=True, help="CompressAI zoo architecture of the checkpoint")
    evaluate.add_argument(
        "--checkpoint", required=True, help="model.pth, last.ckpt or any checkpoint stdet export reads"
    )
    evaluate.add_argument(
        "--data", default=None, help="folder of PNG/JPEG images (default: bundled eval photos)"
    )
    evaluate.add_argument("--out", default=None, help="folder for eval.json and eval.csv")
    evaluate.add_argument("--metric", default="mse", choices=("mse", "ms-ssim"))
    evaluate.add_argument("--quality", type=int, default=3, help="picks the default lambda of the RD loss")
    evaluate.add_argument("--lmbda", type=float, default=None)
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(run=_eval)

    export = commands.add_parser(
        "export",
        help="write any checkpoint of a run with STDET as a plain CompressAI checkpoint (eval_model)",
    )
    export.add_argument("checkpoint", help="stdet train's last.ckpt, a CompressAI-style dict or a state dict")
    export.add_argument("out", help="where to write {'state_dict': plain} (e.g. model.pth.tar)")
    export.add_argument("--raw", action="store_true", help="the live weights, not the SMA averages")
    export.add_argument("--arch", default=None, help="check that this CompressAI architecture loads it")
    export.set_defaults(run=_export)

    rd = commands.add_parser("rd", help="BD-rate and BD-PSNR between RD curves, and an RD plot")
    rd.add_argument(
        "--curve",
        action="append",
        required=True,
        help="NAME=eval.json,eval.json,... (a file per RD point; a flag per curve; first = anchor)",
    )
    rd.add_argument("--quality", default="psnr", choices=("psnr", "ms-ssim"))
    rd.add_argument("--out", default="runs/rd")
    rd.set_defaults(run=_rd)

    demo = commands.add_parser(
        "demo", help="lambda fine-tuning of a shipped model, plain Adam against STDET (make demo)"
    )
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="steps per run (default: the demo's budget)")
    demo.add_argument("--quick", action="store_true", help="a tiny run that checks the pipeline")
    demo.add_argument(
        "--make-pretrained",
        action="store_true",
        help="train the demo's starting model (about 4 min on one core) into the package's assets",
    )
    demo.set_defaults(run=_demo)

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
    warnings.formatwarning = _one_line_warnings
    from stdet.train import Interrupted, TrainingError

    try:
        return args.run(args)
    except Interrupted as stop:
        print(f"stdet {args.command}: {stop}", file=sys.stderr)
        return 130
    except (TrainingError, ValueError, TypeError, FileNotFoundError) as error:
        if os.environ.get("STDET_DEBUG"):
            raise
        print(f"stdet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
