"""How far the golden run's logged numbers move with the thread count and the CPU code path.

The golden-log test (tests/test_train.py::test_golden_log) runs a fixed 12-step STDET run and compares
its log with tests/golden/train_log.jsonl. This script runs that same run (`stdet train --config`, in a
process of its own) under each setting of

- OMP_NUM_THREADS (1, 2): the reduction order of convolutions, matmuls and our own kernels;
- ATEN_CPU_CAPABILITY (default, avx2, avx512): ATen's vectorised kernels;
- ONEDNN_MAX_CPU_ISA (SSE41, AVX2, unset = the best the CPU has): oneDNN's convolutions;
- MKL_CBWR (unset, COMPATIBLE): MKL's conditional numerical reproducibility (this torch uses MKL for BLAS),

and reports, per logged quantity, the largest relative difference over the run's records from the
run under the test's pinned setting. A setting the CPU does not support falls back to what it has:
the table names the code path each process actually got. A second table shows how far changes of
the training (learning rate, embedding round, warm-up, lambda) move the same quantities under the
pinned setting, and whether the golden test catches each. Writes bench/results/golden_spread.md.
"""

import argparse
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_train import (  # noqa: E402
    GOLDEN_MARGIN,
    GOLDEN_SPREAD,
    PINNED,
    golden_mismatches,
    pinned_environment,
    run_in_subprocess,
    tiny,
)

RESULTS = REPO / "bench" / "results"
QUANTITIES = {kind: tuple(spreads) for kind, spreads in GOLDEN_SPREAD.items()}
SETTINGS = {
    "OMP_NUM_THREADS": ("1", "2"),
    "ATEN_CPU_CAPABILITY": ("default", "avx2", "avx512"),
    "ONEDNN_MAX_CPU_ISA": ("SSE41", "AVX2", None),
    "MKL_CBWR": (None, "COMPATIBLE"),
}
# Changes of the training the golden test must catch, run under the pinned setting.
CHANGES = {
    "lr 1e-3 -> 1.1e-3": {"lr": 1.1e-3},
    "lr 1e-3 -> 1.01e-3": {"lr": 1.01e-3},
    "embed_rate 0.2 -> 0.25": {"embed_rate": 0.25},
    "embed_rate 0.2 -> 0.21": {"embed_rate": 0.21},
    "warmup_steps 4 -> 5": {"warmup_steps": 5},
    "lmbda 0.01 -> 0.0101": {"lmbda": 0.0101},
    "modes 3 -> 4": {"modes": 4},
}
# A strided 5x5 convolution: oneDNN runs it and, with ONEDNN_VERBOSE, names its ISA.
PROBE = (
    "import torch\n"
    "torch.nn.functional.conv2d(torch.ones(2, 3, 16, 16), torch.ones(4, 3, 5, 5), stride=2)\n"
    "print('aten:', torch.backends.cpu.get_cpu_capability())\n"
)


def code_path(setting: dict[str, str]) -> str:
    """The ATen capability and oneDNN ISA a process under `setting` actually uses."""
    env = {**pinned_environment(setting), "ONEDNN_VERBOSE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    ).stdout
    aten = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("aten:"))
    isa = next((line.split("isa:", 1)[1] for line in out.splitlines() if "isa:" in line), "?")
    isa = isa.removeprefix("Intel ").split(" with ")[0]
    return f"{aten} / {isa}"


def spread(run: list[dict], reference: list[dict]) -> dict[tuple[str, str], float]:
    """Largest |run - reference| / |reference| over the records, per (record type, quantity)."""
    assert [(r["type"], r["step"]) for r in run] == [(r["type"], r["step"]) for r in reference]
    result = {}
    for kind, keys in QUANTITIES.items():
        for key in keys:
            pairs = [(a[key], b[key]) for a, b in zip(run, reference, strict=True) if b["type"] == kind]
            result[kind, key] = max(abs(a - b) / abs(b) if b else abs(a) for a, b in pairs)
    return result


def fmt(value: float, digits: int = 2) -> str:
    return "0" if value == 0 else f"{value:.{digits - 1}e}"


def cells(measured: dict[tuple[str, str], float], mark: bool = False, digits: int = 2) -> list[str]:
    """One cell per quantity; with `mark`, bold where the golden test's tolerance is exceeded."""
    out = []
    for kind, key in measured:
        text = fmt(measured[kind, key], digits)
        exceeded = measured[kind, key] > GOLDEN_MARGIN * GOLDEN_SPREAD[kind][key]
        out.append(f"**{text}**" if mark and exceeded else text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "golden_spread.md")
    args = parser.parse_args()
    columns = [(kind, key) for kind, keys in QUANTITIES.items() for key in keys]
    started = time.perf_counter()
    rows, changes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        reference = run_in_subprocess(tiny(Path(tmp) / "reference"), PINNED)
        repeat = spread(run_in_subprocess(tiny(Path(tmp) / "repeat"), PINNED), reference)
        for i, values in enumerate(itertools.product(*SETTINGS.values())):
            setting = {k: v for k, v in zip(SETTINGS, values, strict=True) if v is not None}
            run = run_in_subprocess(tiny(Path(tmp) / str(i)), setting)
            rows.append((setting, code_path(setting), spread(run, reference)))
            print(setting, dict(zip(columns, cells(rows[-1][2]), strict=True)), flush=True)
        for name, change in CHANGES.items():
            run = run_in_subprocess(tiny(Path(tmp) / f"change{len(changes)}", **change), PINNED)
            changes.append((name, spread(run, reference), bool(golden_mismatches(run, reference))))
            print(name, dict(zip(columns, cells(changes[-1][1]), strict=True)), flush=True)
    worst = {column: max(row[2][column] for row in rows) for column in columns}
    in_test = {(kind, key): GOLDEN_SPREAD[kind][key] for kind, key in columns}
    quantity_header = " | ".join(f"{kind} {key}" for kind, key in columns) + " |"
    right = "| ---: " * len(columns) + "|"
    pinned = ", ".join(f"{k}={v}" for k, v in PINNED.items())
    lines = [
        "# Spread of the golden run's numbers over thread counts and CPU code paths",
        "",
        f"`bench/golden_spread.py` at {revision()} on {os.cpu_count()} cores ({cpu_name()}), "
        f"torch {torch_version()}, "
        f"{time.perf_counter() - started:.0f} s. The run: `tiny()` of tests/test_train.py "
        "(bmshj2018-factorized N=8 M=12, 12 steps of 2 crops of 32 px, STDET from step 4, "
        "entropy-coded evaluation at steps 6 and 12 on the three bundled eval photos), each in a "
        "process of its own.",
        "",
        "Each cell: the largest relative difference, over the run's records, from the run under the "
        f"golden test's pinned setting ({pinned}). Train columns are the per-step training records (12), "
        "eval columns the entropy-coded evaluations (2). Unset variables are left to the libraries "
        "(threads: all cores; ATen and oneDNN: the best the CPU has; MKL: its fastest path).",
        "",
        "The pinned setting run twice: "
        + ("identical numbers." if not any(repeat.values()) else "DIFFERENT numbers."),
        "",
        "## Settings",
        "",
        "| threads | ATEN_CPU_CAPABILITY | ONEDNN_MAX_CPU_ISA | MKL_CBWR | got (ATen / oneDNN) | "
        + quantity_header,
        "| --- " * 5 + right,
    ]
    for setting, got, measured in rows:
        names = [setting.get(name, "unset") for name in SETTINGS]
        lines.append("| " + " | ".join([*names, got, *cells(measured)]) + " |")
    lines += [
        "| **measured max** | | | | | " + " | ".join(cells(worst, digits=4)) + " |",
        "| GOLDEN_SPREAD in the test | | | | | " + " | ".join(cells(in_test)) + " |",
        "",
        f"The test allows {GOLDEN_MARGIN} x GOLDEN_SPREAD per quantity; GOLDEN_SPREAD "
        + (
            "covers the measured max."
            if all(in_test[c] >= worst[c] for c in columns)
            else "DOES NOT cover the measured max: update tests/test_train.py."
        ),
        "",
        "## Changes of the training (pinned setting)",
        "",
        f"Bold: beyond the test's tolerance ({GOLDEN_MARGIN} x GOLDEN_SPREAD).",
        "",
        "| change | golden test | " + quantity_header,
        "| --- | --- " + right,
    ]
    for name, measured, fails in changes:
        verdict = "fails" if fails else "passes"
        lines.append("| " + " | ".join([name, verdict, *cells(measured, mark=True)]) + " |")
    missed = [name for name, _, fails in changes if not fails]
    lines += [
        "",
        "Not caught: "
        + (", ".join(missed) if missed else "none")
        + (" (nothing moves past the spread of the settings)." if missed else "."),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def revision() -> str:
    """The commit measured (`-dirty`: with uncommitted changes in the working tree)."""
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO
    )
    return described.stdout.strip() or "an unknown commit"


def torch_version() -> str:
    import torch

    return torch.__version__


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
