"""`stdet train` and `stdet eval`: golden log, exact resume, signals, real entropy coding, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

from stdet import export_state_dict
from stdet.cli import main
from stdet.config import STDETConfig
from stdet.train import TrainConfig, Trainer, load_checkpoint, train

GOLDEN = Path(__file__).parent / "golden" / "train_log.jsonl"
REPO = Path(__file__).resolve().parents[1]


def tiny(out: Path, **changes) -> TrainConfig:
    """A run that takes seconds: factorized prior N=8 M=12, 32-pixel crops, STDET from step 4."""
    settings = dict(
        arch="bmshj2018-factorized",
        N=8,
        M=12,
        lmbda=0.01,
        batch_size=2,
        patch_size=32,
        lr=1e-3,
        steps=12,
        eval_every=6,
        log_every=1,
        checkpoint_every=5,
        method="stdet",
        warmup_steps=4,
        snapshots=2,
        modes=3,
        embed_every=2,
        embed_rate=0.2,
        start="warmup",
        out=str(out),
        progress=False,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# The variables that choose the thread count and the CPU code path of torch, oneDNN and MKL.
CODE_PATH_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
)
# The golden run's setting: one thread, and the lowest code path every x86-64 CPU this torch runs on
# has (ATen's unvectorised kernels, oneDNN's SSE4.1 convolutions, MKL's reproducible path). ARM CPUs
# ignore the x86 names and keep their one path; with one thread the reduction order is fixed.
PINNED = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
}


def pinned_environment(setting: dict[str, str]) -> dict[str, str]:
    """This process's environment with the code-path variables replaced by `setting` (unset if absent)."""
    env = {k: v for k, v in os.environ.items() if k not in CODE_PATH_VARIABLES}
    return {**env, **setting, "PYTHONWARNINGS": "ignore"}


def run_in_subprocess(config: TrainConfig, setting: dict[str, str]) -> list[dict]:
    """`stdet train` on `config` in a process of its own under `setting`; the log's records."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "run.toml"
    config_file.write_text(config.to_toml())
    (out / "log.jsonl").unlink(missing_ok=True)
    finished = subprocess.run(
        [sys.executable, "-m", "stdet", "train", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=600,
        env=pinned_environment(setting),
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "stdet", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# ----------------------------------------------------------------------------------------------


def test_config_round_trips_through_toml_and_rejects_bad_values() -> None:
    config = tiny(Path("runs/x"), sma_every=3, sma_alpha=0.2)
    assert TrainConfig.from_dict(tomllib.loads(config.to_toml())) == config
    with pytest.raises(ValueError, match="^config: unknown setting"):
        TrainConfig.from_dict({"stepz": 3})
    for change, flag in [
        ({"steps": 0}, "--steps"),
        ({"metric": "l1"}, "--metric"),
        ({"method": "sgd"}, "--method"),
        ({"lr": -1.0}, "--lr"),
        ({"embed_rate": 2.0}, "--embed-rate"),
        ({"sma_mode": "x"}, "--sma-mode"),
        ({"quality": 9}, "--quality"),
        ({"metric": "ms-ssim", "patch_size": 64}, "--patch-size"),
        ({"max_drift": -1.0}, "--max-drift"),
        ({"sensitivity": "magnitude"}, "--sensitivity"),
        ({"sma_guard_sigmas": -1.0}, "--sma-guard-sigmas"),
    ]:
        with pytest.raises(ValueError, match=f"^{flag}: "):
            replace(config, **change)


def test_optional_stdet_knobs_stay_out_of_older_configurations() -> None:
    """max_drift and continuity default to None (STDETConfig's defaults) and are left out of run.toml,
    so a configuration written before they existed reads, and caches, the same."""
    config = tiny(Path("runs/x"))
    assert all(knob not in config.to_toml() for knob in ("max_drift", "continuity", "sensitivity"))
    assert config.stdet_config().continuity and config.stdet_config().max_drift == 0.05
    jump = replace(config, continuity=False, max_drift=1.0)
    assert TrainConfig.from_dict(tomllib.loads(jump.to_toml())) == jump
    assert not jump.stdet_config().continuity and jump.stdet_config().max_drift == 1.0


# Per logged quantity, the largest relative difference from the pinned run measured over 36 settings
# of threads (1, 2), ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_CBWR (bench/golden_spread.py,
# bench/results/golden_spread.md), rounded up to 2 digits; the test allows GOLDEN_MARGIN times it. The
# run amplifies a rounding difference chaotically (embedding decisions, rounded latents), so this is
# the spread of the settings that happened to move it most, not a bound from error analysis.
GOLDEN_MARGIN = 3
GOLDEN_SPREAD = {
    "train": {"loss": 1.1e-3, "mse": 1.2e-3, "bpp": 2.9e-5, "aux_loss": 1.5e-6, "trainable_fraction": 1.1e-4},
    "eval": {"bpp": 1.5e-4, "estimated_bpp": 2.0e-4, "psnr": 4.3e-3, "ms_ssim": 7.2e-3, "rd_loss": 1.0e-2},
}


def golden_mismatches(got: list[dict], expected: list[dict]) -> list[str]:
    """Each (record, quantity) of `got` farther from `expected` than its tolerance, as a readable line."""
    if [(r["type"], r["step"]) for r in got] != [(r["type"], r["step"]) for r in expected]:
        return [f"records {[(r['type'], r['step']) for r in got]} != golden's"]
    problems = []
    for have, want in zip(got, expected, strict=True):
        for key, spread in GOLDEN_SPREAD[want["type"]].items():
            tolerance = GOLDEN_MARGIN * spread
            if abs(have[key] - want[key]) > tolerance * abs(want[key]):
                problems.append(
                    f"{want['type']} step {want['step']} {key}: {have[key]!r} vs golden {want[key]!r} "
                    f"(rel {abs(have[key] - want[key]) / abs(want[key]):.1e} > {tolerance:.1e})"
                )
    return problems


def test_golden_log(tmp_path) -> None:
    """A fixed tiny STDET run's logged numbers against tests/golden/train_log.jsonl.

    Portable by pinning, with a tolerance for what pinning cannot fix: the run goes in a process of its
    own under PINNED (one thread, ATen's default kernels, oneDNN capped at SSE4.1, MKL's reproducible
    path), whatever the suite's threads and code path, and each quantity may move by 3x the largest
    spread measured over 36 thread/code-path settings (GOLDEN_SPREAD). It still fails on a real change:
    lr 1e-3 -> 1.01e-3, embed_rate 0.2 -> 0.21, warmup_steps 4 -> 5, lmbda 0.01 -> 0.0101 each move
    some quantity past its tolerance (the second table of bench/results/golden_spread.md), and a step
    more or less changes the records. STDET_UPDATE_GOLDEN=1 rewrites the file from this pinned run.
    """
    logged = run_in_subprocess(tiny(tmp_path), PINNED)
    got = [
        {"type": r["type"], "step": r["step"], **{k: r[k] for k in GOLDEN_SPREAD[r["type"]]}} for r in logged
    ]
    if os.environ.get("STDET_UPDATE_GOLDEN"):
        GOLDEN.write_text("".join(json.dumps(r) + "\n" for r in got))
    expected = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    problems = golden_mismatches(got, expected)
    assert not problems, "\n".join(problems)
    assert got[-1]["type"] == "eval" and expected[-2]["trainable_fraction"] < 1.0  # STDET did embed


@pytest.mark.parametrize("method", ["adam", "stdet"])
def test_resume_equals_the_uninterrupted_run(tmp_path, method) -> None:
    extra = {"sma_every": 2} if method == "adam" else {"sma_every": 2, "sma_mode": "feedback"}
    whole = tiny(tmp_path / "whole", method=method, **extra)
    train(whole)
    first = tiny(tmp_path / "parts", method=method, steps=7, **extra)
    train(first)
    train(replace(first, steps=12), resume=tmp_path / "parts" / "last.ckpt")
    assert records(tmp_path / "whole", "train") == [
        {**r, "steps_per_s": a["steps_per_s"]}
        for r, a in zip(
            records(tmp_path / "parts", "train"), records(tmp_path / "whole", "train"), strict=True
        )
    ]
    a = torch.load(tmp_path / "whole" / "model.pth")
    b = torch.load(tmp_path / "parts" / "model.pth")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    final_a = json.loads((tmp_path / "whole" / "summary.json").read_text())["final_eval"]
    final_b = json.loads((tmp_path / "parts" / "summary.json").read_text())["final_eval"]
    assert final_a == final_b


def test_checkpoint_holds_everything_and_is_written_atomically(tmp_path) -> None:
    train(tiny(tmp_path, steps=6))
    checkpoint = load_checkpoint(tmp_path)
    # STDET's state travels inside the model's state dict
    assert checkpoint["step"] == 6 and checkpoint["model"]["stdet._extra_state"]["phase"] == "embedding"
    assert set(checkpoint) >= {"model", "optimizer", "aux_optimizer", "rng", "config", "curve"}
    assert TrainConfig(**checkpoint["config"]) == tiny(tmp_path, steps=6)
    assert not list(tmp_path.glob("*.tmp"))
    config_file = tomllib.loads((tmp_path / "config.toml").read_text())
    assert TrainConfig.from_dict(config_file) == tiny(tmp_path, steps=6)


def test_sigint_leaves_a_loadable_checkpoint_that_resumes(tmp_path) -> None:
    config = tiny(tmp_path, steps=100000, eval_every=0, checkpoint_every=100000)
    config_file = tmp_path / "run.toml"
    config_file.write_text(config.to_toml())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stdet", "train", "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 6):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopped by SIGINT" in stderr and "Traceback" not in stderr
    checkpoint = load_checkpoint(tmp_path / "last.ckpt")
    stopped = checkpoint["step"]
    assert stopped >= 6
    summary = train(replace(config, steps=stopped + 2), resume=tmp_path / "last.ckpt")
    assert summary["steps"] == stopped + 2
    assert [r["step"] for r in records(tmp_path, "train")] == list(range(1, stopped + 3))


def test_eval_round_trips_a_checkpoint_with_real_entropy_coding(tmp_path, capsys) -> None:
    summary = train(tiny(tmp_path / "run", steps=6))
    assert (
        main(
            [
                "eval",
                "--arch",
                "bmshj2018-factorized",
                "--checkpoint",
                str(tmp_path / "run" / "model.pth"),
                "--lmbda",
                "0.01",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(result["images"]) == {"coffee", "flower", "grace_hopper"}
    mean = result["mean"]
    # The exported plain model codes the eval photos as the parametrized one did during training.
    for key in ("bpp", "psnr", "rd_loss"):
        assert mean[key] == pytest.approx(summary["final_eval"][key], rel=1e-4), key
    for record in result["images"].values():
        assert record["bytes"] > 0 and record["encode_s"] > 0 and record["decode_s"] > 0
        assert record["bpp"] == pytest.approx(
            record["bytes"]
            * 8
            / (
                math.prod(
                    {"coffee": (400, 600), "flower": (427, 640), "grace_hopper": (600, 512)}[
                        next(k for k, v in result["images"].items() if v is record)
                    ]
                )
            )
        )
        assert record["estimated_bpp"] == pytest.approx(record["bpp"], rel=0.1, abs=0.02)
        assert 0 < record["ms_ssim"] <= 1
    csv_lines = (tmp_path / "eval" / "eval.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[-1].startswith("mean,")
    assert "grace_hopper" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["adam", "stdet"])
def test_eval_live_codes_the_live_weights_beside_the_average_and_changes_no_step(tmp_path, method) -> None:
    """With shadow SMA the loop's eval codes the average; eval_live adds the live weights' eval, which
    must equal coding ``last.ckpt`` exported raw, and must leave the training itself alone."""
    from stdet.data import bundled_images
    from stdet.evaluate import evaluate
    from stdet.export import read_plain_state_dict
    from stdet.train import load_model

    plain = tiny(tmp_path / "plain", method=method, sma_every=2, sma_guard=False)  # the average, always
    both = replace(plain, out=str(tmp_path / "both"), eval_live=True)
    assert "\neval_live =" not in plain.to_toml()
    summary_plain, summary_both = train(plain), train(both)
    assert "live_curve" not in summary_plain

    def train_records(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records(out, "train")]

    assert train_records(tmp_path / "plain") == train_records(tmp_path / "both")
    assert summary_both["curve"] == summary_plain["curve"]  # the average's, as without eval_live
    assert [step for step, _ in summary_both["live_curve"]] == [6, 12]
    live_weights, _ = read_plain_state_dict(tmp_path / "both" / "last.ckpt", raw=True)
    coded = evaluate(load_model(both.arch, live_weights), bundled_images("eval"), both.metric, both.lmbda)
    for key in ("bpp", "psnr", "rd_loss"):
        assert summary_both["live_final_eval"][key] == pytest.approx(coded["mean"][key], rel=1e-4), key
    assert summary_both["live_final_eval"] != summary_both["final_eval"]
    assert records(tmp_path / "both", "eval")[-1]["live"]["rd_loss"] == summary_both["live_curve"][-1][1]


def test_bd_rate_of_known_curves(tmp_path, capsys) -> None:
    from stdet.evaluate import bd_psnr, bd_rate

    rates = [0.2, 0.4, 0.7, 1.1]
    psnrs = [28.0, 30.5, 32.6, 34.1]
    assert bd_rate((rates, psnrs), ([0.8 * r for r in rates], psnrs)) == pytest.approx(-20.0, abs=1e-6)
    assert bd_psnr((rates, psnrs), (rates, [p + 0.5 for p in psnrs])) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="^anchor: at least 2"):
        bd_rate(([0.1], [30.0]), (rates, psnrs))
    # Through the CLI, from eval.json files.
    for name, scale in (("a", 1.0), ("b", 0.9)):
        for i, (r, p) in enumerate(zip(rates, psnrs, strict=True)):
            folder = tmp_path / f"{name}{i}"
            folder.mkdir()
            (folder / "eval.json").write_text(json.dumps({"mean": {"bpp": r * scale, "psnr": p}}))
    curve = lambda n: f"{n}=" + ",".join(str(tmp_path / f"{n}{i}") for i in range(4))  # noqa: E731
    assert main(["rd", "--curve", curve("a"), "--curve", curve("b"), "--out", str(tmp_path / "rd")]) == 0
    result = json.loads((tmp_path / "rd" / "rd.json").read_text())
    assert result["curves"]["b"]["bd_rate_percent"] == pytest.approx(-10.0, abs=1e-6)
    assert (tmp_path / "rd" / "rd.png").stat().st_size > 1000
    assert "BD-rate -10.00%" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"stdet {command}: error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


def test_bad_inputs_give_one_clear_line(tmp_path, capsys) -> None:
    base = [
        "train",
        "--N",
        "8",
        "--M",
        "12",
        "--patch-size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*base, "--data", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in _one_error_line(capsys, "train")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main([*base, "--data", str(corrupt)]) == 2
    assert "no usable PNG/JPEG image" in _one_error_line(capsys, "train")

    assert main([*base, "--arch", "bmshj2099"]) == 2
    assert "--arch: unknown architecture 'bmshj2099'" in _one_error_line(capsys, "train")

    assert main([*base, "--config", str(tmp_path / "none.toml")]) == 2
    assert "--config" in _one_error_line(capsys, "train")

    assert main([*base, "--resume"]) == 2
    assert "--resume: no checkpoint" in _one_error_line(capsys, "train")

    train(tiny(tmp_path / "run", steps=2, method="adam"))
    model = str(tmp_path / "run" / "model.pth")
    assert main(["eval", "--arch", "mbt2018-mean", "--checkpoint", model]) == 2
    assert "checkpoint: does not fit mbt2018-mean" in _one_error_line(capsys, "eval")
    assert main(["eval", "--arch", "bmshj2018-factorized", "--checkpoint", str(tmp_path / "x.pth")]) == 2
    assert "does not exist" in _one_error_line(capsys, "eval")
    assert main([*base, "--resume", str(tmp_path / "run"), "--lr", "0.5"]) == 2
    assert "--resume: --lr is 0.5 here" in _one_error_line(capsys, "train")


def test_a_corrupt_image_among_good_ones_is_skipped_with_a_warning(tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "small.png")
    with pytest.warns(UserWarning, match="skipped 2 image"):
        summary = train(
            tiny(tmp_path / "out", steps=2, method="adam", data=str(folder), eval_data=str(folder))
        )
    assert summary["steps"] == 2


def test_probe_data_gives_the_probe_batch_from_held_out_photos(tmp_path) -> None:
    """--probe-data: the probe batch (plateau test, SMA guard) is crops of those photos, not of the
    training photos; the configuration without it is unchanged (older runs' caches still fit)."""
    folder = tmp_path / "probe"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(folder / "gray.png")
    default = Trainer(tiny(tmp_path / "a", sma_every=2))
    held_out = Trainer(tiny(tmp_path / "b", sma_every=2, probe_data=str(folder)))
    assert torch.all(held_out.probe_batch == 128 / 255)
    assert held_out.probe_batch.shape == default.probe_batch.shape
    assert not torch.all(default.probe_batch == default.probe_batch.flatten()[0])
    assert not any(line.startswith("probe_data") for line in tiny(tmp_path / "c").to_toml().splitlines())
    with pytest.raises(FileNotFoundError, match="^--probe-data: data: .* is not a directory"):
        Trainer(tiny(tmp_path / "d", sma_every=2, probe_data=str(tmp_path / "missing")))
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(small / "small.png")
    with (
        pytest.warns(UserWarning, match="skipped 1 image"),
        pytest.raises(ValueError, match="^--probe-data: "),
    ):
        Trainer(tiny(tmp_path / "e", sma_every=2, probe_data=str(small)))


def test_the_cli_process_exits_without_a_traceback() -> None:
    finished = run_cli("train", "--arch", "nope", "--steps", "1")
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        finished.stderr.strip().splitlines()[0]
    ] and finished.stderr.startswith("stdet train: error: --arch: unknown architecture")


# ----------------------------------------------------------------------------------------------
# Several processes


# CompressAI draws its training quantisation noise from the global generator, and each rank has its own
# stream: to compare with one process, the test makes the noise a function of the value it is added to.
HASHED_NOISE = r"""
import torch
from compressai.entropy_models import EntropyModel

_quantize = EntropyModel.quantize


def _hashed_noise_quantize(self, inputs, mode, means=None):
    if mode == "noise":
        noise = torch.frac(torch.sin(inputs.detach() * 12.9898 + 78.233).abs() * 43758.5453) - 0.5
        return inputs + noise
    return _quantize(self, inputs, mode, means)


EntropyModel.quantize = _hashed_noise_quantize
"""

WORKER = (
    HASHED_NOISE
    + r"""
import json, sys
import torch, torch.distributed as dist
from stdet.train import TrainConfig, Trainer
from stdet import export_state_dict
dist.init_process_group("gloo")
config = TrainConfig(**json.loads(sys.argv[1]))
trainer = Trainer(config)
trainer.run()
weights = export_state_dict(trainer.model).values()
flat = torch.cat([t.reshape(-1).double() for t in weights if t.is_floating_point()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    torch.save({"ranks": gathered, "trainable": trainer.trainable_fraction()}, sys.argv[2])
dist.destroy_process_group()
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adam", "stdet"])
def test_two_processes_with_gloo_match_one_process(tmp_path, method) -> None:
    config = tiny(
        tmp_path / "ddp", method=method, batch_size=4, steps=8, lr=1e-4, eval_every=0, checkpoint_every=8
    )
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    finished = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(worker),
            json.dumps(asdict(config)),
            str(tmp_path / "ranks.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = torch.load(tmp_path / "ranks.pt")
    rank0, rank1 = result["ranks"]
    assert torch.equal(rank0, rank1)  # the ranks hold identical weights
    from compressai.entropy_models import EntropyModel

    def one_process(batch_size: int) -> tuple[Trainer, torch.Tensor]:
        # One thread, as each rank has, and the code path the ranks inherit from this process: the
        # comparison then differs only by the split of the batch, whatever the suite's thread count.
        original, threads = EntropyModel.quantize, torch.get_num_threads()
        try:
            exec(HASHED_NOISE, {})
            torch.set_num_threads(1)
            trainer = Trainer(replace(config, batch_size=batch_size, out=str(tmp_path / f"one{batch_size}")))
            trainer.run()
        finally:
            EntropyModel.quantize = original
            torch.set_num_threads(threads)
        weights = export_state_dict(trainer.model).values()
        return trainer, torch.cat([t.reshape(-1).double() for t in weights if t.is_floating_point()])

    single, flat = one_process(config.batch_size)
    # Gradients are summed in another order: mode discovery may end up with a mode more or less.
    assert result["trainable"] == pytest.approx(single.trainable_fraction(), abs=1e-3)
    assert (single.trainable_fraction() < 1.0) == (method == "stdet")
    ddp_losses = [r["loss"] for r in records(tmp_path / "ddp", "train")]
    assert ddp_losses == pytest.approx([r["loss"] for r in records(tmp_path / "one4", "train")], rel=1e-3)
    # Not element by element: Adam's first steps move every weight by about lr * sign(gradient), so a
    # gradient that rounding puts on the other side of zero moves its weight by 2 lr. The bulk agrees.
    difference = (rank0 - flat).abs()
    assert float(difference.median()) < 5e-6 and float(difference.max()) < 2 * config.lr * config.steps
    # ... which a run on another batch (half of it) does not.
    _, half = one_process(config.batch_size // 2)
    assert float((rank0 - half).abs().median()) > 1e-5


@pytest.mark.slow
def test_quick_demo_writes_the_summary_schema(tmp_path) -> None:
    """`stdet demo --quick`: both fine-tuning runs from the shipped model, the four results, the files."""
    from stdet.demo import LABELS, PRETRAINED_RECORD

    out = tmp_path / "demo"
    finished = run_cli("demo", "--quick", "--out", str(out), timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"setting", "pretrained", "start", "stdet_config", "results", "runs", "wall_s"}
    results = summary["results"]
    assert set(results) == {"Adam", "Adam + EMA", "STDET", "STDET + SMA"}
    for result in [*results.values(), summary["start"]]:
        assert {"bpp", "psnr", "rd_loss"} <= set(result) and result["rd_loss"] > 0
    assert results["Adam"]["change_vs_adam"] == 0.0
    assert results["STDET"]["change_vs_adam"] == pytest.approx(
        results["STDET"]["rd_loss"] / results["Adam"]["rd_loss"] - 1
    )
    assert results["Adam + EMA"] != results["Adam"]  # the average is coded, not the live weights again
    assert summary["runs"]["adam"]["final_weights"] == "average"  # the plain EMA: no guard
    guarded = summary["runs"]["stdet"]["final_weights"]  # STDET's SMA guard: either, and said so
    assert guarded in ("average", "live") and f"handed out the {guarded}" in (out / "report.md").read_text()
    steps = summary["setting"]["steps"]
    for name, (live, average) in LABELS.items():
        run = summary["runs"][name]
        assert [step for step, _ in run["curve"]] == [step for step, _ in run["average_curve"]]
        assert run["curve"][-1] == [steps, results[live]["rd_loss"]]
        assert run["average_curve"][-1] == [steps, results[average]["rd_loss"]]
        assert run["wall_s"] > 0 and run["peak_rss_mb"] > 0
    assert summary["runs"]["adam"]["trainable_fraction_end"] == 1.0
    assert summary["runs"]["adam"]["trainable_fraction_min"] == 1.0
    stdet = summary["runs"]["stdet"]
    assert 0 < stdet["trainable_fraction_min"] <= stdet["trainable_fraction_end"] <= 1.0
    assert summary["stdet_config"]["warmup_steps"] == summary["setting"]["warmup_steps"]
    shipped = json.loads(PRETRAINED_RECORD.read_text())
    assert summary["pretrained"]["weights_sha256"] == shipped["weights_sha256"]
    for name in ("report.md", "curves.png", "rd_points.png", "adam.out", "stdet.out"):
        assert (out / name).stat().st_size > 0
    assert "| STDET + SMA |" in finished.stdout


def test_the_shipped_pretrained_model_matches_its_record_and_loads(tmp_path) -> None:
    """The demo's starting model is in the package, holds the weights its record names, was made by
    the demo's pretraining recipe, and loads into the demo's architecture; a changed weight, a changed
    recipe and a missing file are each refused with the way to remake it."""
    from stdet import demo
    from stdet.train import TrainingError, load_model

    record = demo.check_pretrained()
    assert record["recipe"] == demo.recipe(demo.pretrain_config(tmp_path))
    assert (
        record["recipe"]["lmbda"] == demo.PRETRAIN_LMBDA and record["recipe"]["steps"] == demo.PRETRAIN_STEPS
    )
    assert demo.PRETRAINED.stat().st_size < 4e6
    state = torch.load(demo.PRETRAINED, map_location="cpu", weights_only=True)
    model = load_model(demo.ARCH, state)
    assert (model.N, model.M) == (demo.N, demo.M)

    name = next(key for key, value in state.items() if value.is_floating_point())
    changed = tmp_path / "changed.pth"
    torch.save({**state, name: state[name] + 1e-6}, changed)
    with pytest.raises(TrainingError, match="sha256.*stdet demo --make-pretrained"):
        demo.check_pretrained(changed, demo.PRETRAINED_RECORD)
    other_recipe = tmp_path / "other.json"
    other_recipe.write_text(json.dumps({**record, "recipe": {**record["recipe"], "lr": 1e-3}}))
    with pytest.raises(TrainingError, match="made with lr=0.001, but the demo's pretraining has lr=0.0005"):
        demo.check_pretrained(demo.PRETRAINED, other_recipe)
    with pytest.raises(TrainingError, match="missing; make it with `stdet demo --make-pretrained`"):
        demo.check_pretrained(tmp_path / "absent.pth", demo.PRETRAINED_RECORD)


def test_resume_from_the_written_config_finds_its_checkpoint(tmp_path, capsys) -> None:
    train(tiny(tmp_path / "run", steps=4, method="adam"))
    config = str(tmp_path / "run" / "config.toml")
    assert main(["train", "--config", config, "--steps", "6", "--resume"]) == 0
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3, 4, 5, 6]
    assert "done: 6 steps" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["adam", "stdet"])
def test_sma_guard_hands_out_the_live_weights_where_the_probe_says_the_average_is_worse(
    tmp_path, method
) -> None:
    """The guard compares the probe crops' losses with the live weights and with the average at
    every evaluation: each eval record carries both means, their paired difference and its standard
    error, and names the weights handed out, which are the average exactly where it is lower by more
    than two standard errors (the default). The eval and the exported model are of those weights;
    without the guard they are the average whatever the probe says. Training is the same."""
    from stdet.data import bundled_images
    from stdet.evaluate import evaluate
    from stdet.export import read_plain_state_dict
    from stdet.train import load_model

    # lr 1e-2: a fast-moving model, so that the average, lagging, is worse somewhere
    guarded = tiny(tmp_path / "guarded", method=method, sma_every=1, sma_alpha=0.1, lr=1e-2, eval_every=2)
    assert TrainConfig().sma_guard is None and "\nsma_guard =" not in guarded.to_toml()
    assert TrainConfig().sma_guard_sigmas is None and "\nsma_guard_sigmas =" not in guarded.to_toml()
    plain = replace(guarded, out=str(tmp_path / "plain"), sma_guard=False, eval_live=True)
    summary_guarded, summary_plain = train(guarded), train(plain)
    evals_guarded, evals_plain = records(tmp_path / "guarded", "eval"), records(tmp_path / "plain", "eval")
    expected = "average" if method == "stdet" else None  # the guard's default: on for stdet only
    chosen = []
    for guarded_record, plain_record in zip(evals_guarded, evals_plain, strict=True):
        probe = guarded_record["probe"]
        assert probe == plain_record["probe"]  # the same training, the same probes
        assert plain_record["weights"] == "average"
        assert probe["difference"] == pytest.approx(probe["average"] - probe["live"], rel=0, abs=1e-12)
        assert probe["se"] > 0
        worse = not probe["difference"] < -STDETConfig().sma_guard_sigmas * probe["se"]
        chosen.append(guarded_record["weights"])
        if method == "stdet":
            assert guarded_record["weights"] == ("live" if worse else expected)
            source = plain_record["live"] if worse else plain_record
        else:
            assert guarded_record["weights"] == "average"  # adam: the guard is off by default
            source = plain_record
        assert guarded_record["rd_loss"] == pytest.approx(source["rd_loss"], rel=1e-6)
    if method == "stdet":
        assert "live" in chosen, "the test's run never made the average worse: it checks nothing"
        assert "average" in chosen, "the test's run never made the average better: half of it is untested"
        assert summary_guarded["final_weights"] == chosen[-1]
        exported = torch.load(tmp_path / "guarded" / "model.pth", weights_only=True)
        model = load_model(guarded.arch, exported)
        coded = evaluate(model, bundled_images("eval"), guarded.metric, guarded.lmbda)
        assert coded["mean"]["rd_loss"] == pytest.approx(summary_guarded["final_eval"]["rd_loss"], rel=1e-4)
        if chosen[-1] == "live":
            live_weights, _ = read_plain_state_dict(tmp_path / "guarded" / "last.ckpt", raw=True)
            for key, tensor in live_weights.items():
                if tensor.is_floating_point():
                    assert torch.equal(exported[key], tensor), key
    assert summary_plain["final_weights"] == "average"


@pytest.mark.parametrize(("metric", "patch_size"), [("mse", 32), ("ms-ssim", 176)])
def test_the_probe_crops_losses_are_the_probe_loss_crop_by_crop(tmp_path, metric, patch_size) -> None:
    """The SMA guard's per-crop losses: each is `probe_loss` of a probe batch of that crop alone, and
    their mean is `probe_loss` of the whole batch; in chunks or not."""
    config = tiny(tmp_path / "run", sma_every=2, batch_size=3, metric=metric, patch_size=patch_size)
    trainer = Trainer(config)
    losses = trainer.probe_losses()
    assert losses.shape == (3,) and losses.dtype == torch.float32
    torch.testing.assert_close(trainer.probe_losses(chunk=1), losses, rtol=1e-6, atol=0)
    assert float(losses.mean()) == pytest.approx(trainer.probe_loss(), rel=1e-5)
    batch = trainer.probe_batch
    for i in range(3):
        trainer.probe_batch = batch[i : i + 1]
        assert float(losses[i]) == pytest.approx(trainer.probe_loss(), rel=1e-5)
    assert trainer.model.training  # put back in its mode


def test_sma_guard_sigmas_zero_is_the_plain_comparison_of_the_probe_means(tmp_path) -> None:
    """--sma-guard-sigmas 0: the average wherever its mean probe loss is not higher (the old rule)."""
    fast_moving = dict(sma_every=1, sma_alpha=0.1, lr=1e-2, eval_every=1, batch_size=4)
    config = tiny(tmp_path / "run", **fast_moving, sma_guard_sigmas=0.0)
    assert "\nsma_guard_sigmas = 0.0" in config.to_toml()
    train(config)
    evals = records(tmp_path / "run", "eval")
    for record in evals:
        probe = record["probe"]
        assert record["weights"] == ("live" if probe["difference"] > 0 else "average")
    # Where the two rules part: the average lower, by less than two standard errors.
    assert any(-2 * r["probe"]["se"] <= r["probe"]["difference"] <= 0 for r in evals), evals
