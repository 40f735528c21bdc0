"""`make bench`: run the op microbenchmarks and write the table (bench/results/ops.{json,csv,md}).

Two runs. The main one sets glibc's mmap threshold high (MALLOC_MMAP_THRESHOLD_) so freed blocks are
reused, the steady state of training, where every weight tensor is far below glibc's default 32 MB
threshold anyway. Without it, each 40 MB output of an n = 1e7 op is a fresh mmap that the kernel
zero-fills page by page, a cost every provider pays and `copy_` (into an existing tensor) does not. A
second, short run keeps glibc's default for n = 1e7 and reports that too.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 33)}


def run(json_path: Path, selection: str | None, extra_env: dict[str, str]) -> list[dict]:
    command = [sys.executable, "-m", "pytest", str(HERE / "bench_ops.py"), "-q", "-p", "no:cacheprovider"]
    command += [f"--benchmark-json={json_path}", "--benchmark-columns=median,min,max,rounds"]
    if selection:
        command += ["-k", selection]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra_env
    subprocess.run(command, check=True, env=env, cwd=HERE.parent)
    return json.loads(json_path.read_text())["benchmarks"]


def _key(bench: dict) -> tuple:
    info = bench["extra_info"]
    return info["op"], info["n"], info["provider"]


def copy_ceilings(*runs: list[dict]) -> dict[tuple, float]:
    """Bytes per second of `copy_` per (op, n): the fastest median over all runs, so no run is judged
    against a ceiling that happened to be measured low."""
    ceilings: dict[tuple, float] = {}
    for bench in (b for run_ in runs for b in run_):
        op, n, provider = _key(bench)
        if provider == "copy":
            rate = bench["extra_info"]["bytes"] / bench["stats"]["median"]
            ceilings[op, n] = max(rate, ceilings.get((op, n), 0.0))
    return ceilings


def rows(benchmarks: list[dict], ceilings: dict[tuple, float]) -> list[dict]:
    """One row per (op, n, provider) with median time, GB/s and the fraction of the copy ceiling."""
    by_key = {_key(b): b for b in benchmarks}
    result = []
    for (op, n, provider), bench in by_key.items():
        median = bench["stats"]["median"]
        moved = bench["extra_info"]["bytes"]
        copy_rate = ceilings.get((op, n), float("nan"))
        result.append(
            {
                "op": op,
                "n": n,
                "provider": provider,
                "median_ms": median * 1e3,
                "bytes": moved,
                "gb_per_s": moved / median / 1e9,
                "fraction_of_copy": (moved / median) / copy_rate,
                "speedup_of_cpp": by_key[(op, n, "cpp")]["stats"]["median"] / median
                if (op, n, "cpp") in by_key
                else float("nan"),
                "machine": bench["extra_info"]["machine"],
                "malloc_mmap_threshold": bench["extra_info"]["malloc_mmap_threshold"],
            }
        )
    from bench_ops import OPS  # the ops in the benchmark's order

    order = {op: k for k, op in enumerate(OPS)}
    providers = {"cpp": 0, "cpp_unfused": 1, "torch": 2, "torch_compile": 3, "copy": 4}
    return sorted(result, key=lambda r: (order[r["op"]], r["n"], providers[r["provider"]]))


def markdown(table: list[dict]) -> str:
    lines = [
        "| op | n | provider | median ms | MB moved | GB/s | % of copy | cpp is x faster |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        speedup = "" if r["provider"] in ("cpp", "copy") else f"{1 / r['speedup_of_cpp']:.1f}x"
        lines.append(
            f"| {r['op']} | {r['n']:.0e} | {r['provider']} | {r['median_ms']:.3f} | {r['bytes'] / 1e6:.1f} "
            f"| {r['gb_per_s']:.1f} | {100 * r['fraction_of_copy']:.0f}% | {speedup} |"
        )
    return "\n".join(lines)


def targets(table: list[dict]) -> list[str]:
    """The op-layer issue's targets at n = 1e7, each with its measured figure."""
    at = {(r["op"], r["provider"]): r for r in table if r["n"] == 10**7}
    sma_cpp = at[("reconstruct_sma_", "cpp")]
    checks = [
        (
            "cpp reconstruct_sma_ >= 3x eager torch",
            1 / at[("reconstruct_sma_", "torch")]["speedup_of_cpp"],
            3.0,
        ),
        (
            "cpp reconstruct_sma_ at least as fast as torch.compile",
            1 / at[("reconstruct_sma_", "torch_compile")]["speedup_of_cpp"],
            1.0,
        ),
        ("cpp reconstruct_sma_ >= 50% of copy bandwidth", sma_cpp["fraction_of_copy"], 0.5),
        ("cpp backward >= 2x eager torch", 1 / at[("backward", "torch")]["speedup_of_cpp"], 2.0),
    ]
    return [
        f"- {name}: {value:.2f} ({'met' if value >= bound else 'MISSED'})" for name, value, bound in checks
    ]


def main(argv: list[str]) -> int:
    """With --report-only, render the table again from the last run's JSON without measuring."""
    RESULTS.mkdir(exist_ok=True)
    steady_json, default_json = RESULTS / "ops.json", RESULTS / "ops_default_malloc.json"
    if "--report-only" in argv:
        steady_run = json.loads(steady_json.read_text())["benchmarks"]
        default_run = json.loads(default_json.read_text())["benchmarks"]
    else:
        steady_run = run(steady_json, None, STEADY_ALLOCATOR)
        default_run = run(default_json, "1e+07 and (cpp or copy)", {})
    ceilings = copy_ceilings(steady_run, default_run)
    steady, default = rows(steady_run, ceilings), rows(default_run, ceilings)
    with open(RESULTS / "ops.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(steady[0]))
        writer.writeheader()
        writer.writerows(steady + default)
    report = "\n".join(
        [
            f"Machine: {steady[0]['machine']}",
            "",
            "% of copy is against the faster of the two runs' copy_ of the same number of bytes.",
            "",
            f"Steady-state allocator (MALLOC_MMAP_THRESHOLD_={STEADY_ALLOCATOR['MALLOC_MMAP_THRESHOLD_']}):",
            "",
            markdown(steady),
            "",
            "Targets at n = 1e7 (steady-state allocator):",
            *targets(steady),
            "",
            "glibc's default allocator, n = 1e7 (each output is a fresh, zero-filled mmap):",
            "",
            markdown(default),
        ]
    )
    (RESULTS / "ops.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
