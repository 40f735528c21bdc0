"""STDET as a drop-in for CompressAI's own training script: its checkpoints, resume path, schedulers,
and eval tools (`compressai.utils.eval_model`), plus `stdet export`, the step/plateau schedules and
``--init`` of `stdet train`."""

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from compressai.optimizers import net_aux_optimizer
from compressai.zoo import image_models
from test_train import _one_error_line, records, tiny
from torch import nn, optim

import stdet
from stdet.cli import main
from stdet.export import export_checkpoint
from stdet.train import Trainer, learning_rate, load_checkpoint, train

# ---------------------------------------------------------------------------------------------
# A copy of CompressAI's examples/train.py (v1.2.8): the same calls in the same order, shrunk to a
# few tiny batches. The two stdet lines are marked; the only other addition is a per-step seed, so
# that the quantisation noise is reproducible and an interrupted run can be compared with a whole one.


class RateDistortionLoss(nn.Module):
    def __init__(self, lmbda=1e-2):
        super().__init__()
        self.mse = nn.MSELoss()
        self.lmbda = lmbda

    def forward(self, output, target):
        N, _, H, W = target.size()
        out = {}
        num_pixels = N * H * W
        out["bpp_loss"] = sum(
            (torch.log(likelihoods).sum() / (-math.log(2) * num_pixels))
            for likelihoods in output["likelihoods"].values()
        )
        out["mse_loss"] = self.mse(output["x_hat"], target)
        out["loss"] = self.lmbda * 255**2 * out["mse_loss"] + out["bpp_loss"]
        return out


def configure_optimizers(net, learning_rate=1e-3, aux_learning_rate=1e-3):
    conf = {
        "net": {"type": "Adam", "lr": learning_rate},
        "aux": {"type": "Adam", "lr": aux_learning_rate},
    }
    optimizer = net_aux_optimizer(net, conf)
    return optimizer["net"], optimizer["aux"]


BATCHES = torch.rand(4, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
STEPS_PER_EPOCH = 3
STDET_CONFIG = dict(
    warmup_steps=4, snapshots=2, modes=3, samples=50, embed_every=2, embed_rate=0.3, start="warmup"
)


def train_one_epoch(model, criterion, optimizer, aux_optimizer, epoch, clip_max_norm=1.0):
    model.train()
    losses = []
    for i in range(STEPS_PER_EPOCH):
        step = epoch * STEPS_PER_EPOCH + i
        torch.manual_seed(step)  # (not in CompressAI's script: reproducible quantisation noise)
        d = BATCHES[step % len(BATCHES)]
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        out_net = model(d)
        out_criterion = criterion(out_net, d)
        out_criterion["loss"].backward()
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        model.stdet.step(out_criterion["loss"])  # stdet, line 2
        aux_loss = model.aux_loss()
        aux_loss.backward()
        aux_optimizer.step()
        losses.append(float(out_criterion["loss"].detach()))
    return losses


def compressai_train_script(epochs: int, checkpoint_path=None, save_path=None) -> list[float]:
    """examples/train.py's main(): model, optimizers, scheduler, criterion, --checkpoint, epoch loop."""
    torch.manual_seed(0)
    net = image_models["bmshj2018-factorized"](quality=1)
    optimizer, aux_optimizer = configure_optimizers(net)
    stdet.STDET(net, optimizer, stdet.STDETConfig(**STDET_CONFIG, sma_every=2))  # stdet, line 1
    lr_scheduler = optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min")
    criterion = RateDistortionLoss(lmbda=1e-2)
    last_epoch = 0
    if checkpoint_path:
        checkpoint = torch.load(checkpoint_path, map_location="cpu")
        last_epoch = checkpoint["epoch"] + 1
        net.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        aux_optimizer.load_state_dict(checkpoint["aux_optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    losses = []
    for epoch in range(last_epoch, epochs):
        losses += train_one_epoch(net, criterion, optimizer, aux_optimizer, epoch)
        loss = sum(losses[-STEPS_PER_EPOCH:]) / STEPS_PER_EPOCH  # (test_epoch's loss, shortened)
        lr_scheduler.step(loss)
        if save_path is not None:
            torch.save(
                {
                    "epoch": epoch,
                    "state_dict": net.state_dict(),
                    "loss": loss,
                    "optimizer": optimizer.state_dict(),
                    "aux_optimizer": aux_optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                },
                save_path,
            )
    return losses


def test_compressai_script_resumes_exactly_and_its_checkpoint_exports_for_eval_model(tmp_path) -> None:
    whole = compressai_train_script(epochs=4)
    saved = tmp_path / "checkpoint.pth.tar"
    first = compressai_train_script(epochs=2, save_path=saved)  # past the warm-up: attached
    assert first == whole[: len(first)]
    assert torch.load(saved)["state_dict"]["stdet._extra_state"]["phase"] == "embedding"
    rest = compressai_train_script(epochs=4, checkpoint_path=saved)
    assert rest == whole[len(first) :]

    exported = tmp_path / "exported.pth.tar"
    assert main(["export", str(saved), str(exported), "--arch", "bmshj2018-factorized"]) == 0
    # eval_model's own loading function, in a process where importing stdet is impossible
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["stdet"] = sys.modules["stdet_kernels"] = None  # any import of them fails
        import torch
        from compressai.utils.eval_model.__main__ import load_checkpoint
        from compressai.utils.update_model.__main__ import main as update_model
        net = load_checkpoint("bmshj2018-factorized", False, {str(exported)!r})
        x = torch.rand(1, 3, 64, 64)
        strings = net.compress(x)
        assert net.decompress(strings["strings"], strings["shape"])["x_hat"].shape == x.shape
        args = ["--architecture", "bmshj2018-factorized", {str(exported)!r}, "--dir", {str(tmp_path)!r}]
        update_model(args)
        assert not [m for m in sys.modules if m.startswith("stdet")  and sys.modules[m] is not None]
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_export_takes_the_sma_average_unless_raw(tmp_path) -> None:
    saved = tmp_path / "checkpoint.pth.tar"
    compressai_train_script(epochs=2, save_path=saved)
    state = torch.load(saved)["state_dict"]
    averages = state["stdet._extra_state"]["sma"]["averages"]
    averaged = export_checkpoint(saved, tmp_path / "avg.pth.tar")
    live = export_checkpoint(saved, tmp_path / "raw.pth.tar", raw=True)
    assert torch.equal(averaged["g_a.0.weight"], averages["g_a.0.weight"])
    assert not torch.equal(live["g_a.0.weight"], averaged["g_a.0.weight"])
    # the live weights are what the parametrized model computes
    net = image_models["bmshj2018-factorized"](quality=1)
    optimizer, _ = configure_optimizers(net)
    stdet.STDET(net, optimizer, stdet.STDETConfig(**STDET_CONFIG, sma_every=2))
    net.load_state_dict(state)
    computed = stdet.export_state_dict(net)
    assert computed.keys() == live.keys()
    assert all(torch.equal(computed[k], live[k]) for k in live)
    assert torch.load(tmp_path / "raw.pth.tar").keys() == {"state_dict"}


def test_export_bad_input_gives_one_clear_line(tmp_path, capsys) -> None:
    saved = tmp_path / "checkpoint.pth.tar"
    compressai_train_script(epochs=2, save_path=saved)
    out = str(tmp_path / "out.pth.tar")
    assert main(["export", str(tmp_path / "missing.pth"), out]) == 2
    assert "does not exist" in _one_error_line(capsys, "export")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["export", str(tmp_path / "notes.txt"), out]) == 2
    assert "not a readable PyTorch checkpoint" in _one_error_line(capsys, "export")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert main(["export", str(tmp_path / "list.pt"), out]) == 2
    assert "not a checkpoint dict" in _one_error_line(capsys, "export")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    assert main(["export", str(tmp_path / "empty.pt"), out]) == 2
    assert "holds no model state dict" in _one_error_line(capsys, "export")
    assert main(["export", str(saved), out, "--arch", "mbt2018-mean"]) == 2
    assert "does not fit mbt2018-mean" in _one_error_line(capsys, "export")
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedulers: refs follow the network's group whatever the scheduler


SCHEDULERS = {
    "MultiStepLR": lambda o: optim.lr_scheduler.MultiStepLR(o, milestones=[3, 9], gamma=0.1),
    "CosineAnnealingLR": lambda o: optim.lr_scheduler.CosineAnnealingLR(o, T_max=12),
    "LambdaLR": lambda o: optim.lr_scheduler.LambdaLR(o, lambda step: 0.9**step),
    "ReduceLROnPlateau": lambda o: optim.lr_scheduler.ReduceLROnPlateau(o, "min", patience=0),
}


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_refs_follow_any_scheduler_created_before_stdet_attaches(scheduler_name) -> None:
    torch.manual_seed(0)
    net = image_models["bmshj2018-factorized"](quality=1)
    optimizer, _ = configure_optimizers(net)
    st = stdet.STDET(net, optimizer, stdet.STDETConfig(**STDET_CONFIG))  # attaches at step 6
    scheduler = SCHEDULERS[scheduler_name](optimizer)  # decays at step 3, before the attach
    criterion = RateDistortionLoss()
    refs_lrs, net_lrs, expected = [], [], []
    for step in range(12):
        d = BATCHES[step % len(BATCHES)]
        optimizer.zero_grad()
        loss = criterion(net(d), d)["loss"]
        loss.backward()
        optimizer.step()
        st.step(loss)
        if scheduler_name == "ReduceLROnPlateau":
            scheduler.step(1.0)  # never improves: decays every step
        else:
            scheduler.step()
        if st.refs is not None:
            group = next(g for g in optimizer.param_groups if any(p is st.refs for p in g["params"]))
            weight = st.layout.free_values  # the network's weights, all of them now
            net_group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
            refs_lrs.append(group["lr"])
            net_lrs.append(net_group["lr"])
            expected.append(scheduler.get_last_lr()[0])
    assert len(refs_lrs) == 7 and refs_lrs == net_lrs == expected  # (fitted at 4, first round at 6)
    assert refs_lrs[0] < 1e-3  # attached after a decay had happened


# ---------------------------------------------------------------------------------------------
# stdet train: step and plateau schedules, --init


def test_step_schedule_milestones_as_fractions_or_steps(tmp_path) -> None:
    config = tiny(tmp_path, lr_schedule="step", lr_milestones=[0.5, 9], lr_gamma=0.1)
    assert [learning_rate(config, step) for step in (0, 5, 6, 8, 9, 11)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    )


@pytest.mark.parametrize(
    "schedule",
    [dict(lr_schedule="step", lr_milestones=[5]), dict(lr_schedule="plateau", lr_patience=0, lr=1e-2)],
)
def test_step_and_plateau_schedules_resume_exactly(tmp_path, schedule) -> None:
    settings = dict(eval_every=2, sma_every=2, **schedule)
    train(tiny(tmp_path / "whole", **settings))
    # stopped at a step where the whole run evaluates too (a run's last step always evaluates)
    first = tiny(tmp_path / "parts", steps=8, **settings)
    train(first)
    train(tiny(tmp_path / "parts", **settings), resume=tmp_path / "parts" / "last.ckpt")
    whole, parts = records(tmp_path / "whole", "train"), records(tmp_path / "parts", "train")
    assert [{**r, "steps_per_s": 0} for r in whole] == [{**r, "steps_per_s": 0} for r in parts]
    rates = [r["lr"] for r in whole]
    assert rates[0] == tiny(tmp_path, **settings).lr and min(rates) < rates[0]  # the schedule decayed
    if schedule["lr_schedule"] == "plateau":  # decays follow the logged eval losses
        evals = [(r["step"], r["rd_loss"]) for r in records(tmp_path / "whole", "eval")]
        config = tiny(tmp_path, **settings)
        assert rates == [learning_rate(config, r["step"] - 1, evals) for r in whole]


def test_init_fine_tunes_an_exported_checkpoint_at_another_lambda(tmp_path, capsys) -> None:
    train(tiny(tmp_path / "base", method="adam", steps=4, eval_every=0))
    exported = tmp_path / "base.pth.tar"
    export_checkpoint(tmp_path / "base" / "last.ckpt", exported)
    plain = torch.load(exported)["state_dict"]
    tuned = tiny(tmp_path / "tuned", init=str(exported), lmbda=0.05, steps=6, eval_every=0)
    start = Trainer(tuned).model.state_dict()
    assert all(torch.equal(start[k], plain[k]) for k in plain if k.endswith("weight"))
    summary = train(tuned)
    assert summary["steps"] == 6 and records(tmp_path / "tuned", "train")[0]["step"] == 1
    assert main(["train", "--init", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "--init: " in _one_error_line(capsys, "train")
    args = ["train", "--init", str(exported), "--arch", "mbt2018-mean", "--out", str(tmp_path / "y")]
    assert main(args) == 2
    assert "does not fit mbt2018-mean" in _one_error_line(capsys, "train")


def test_a_fine_tuning_run_resumes_after_its_cdf_tables_changed_size(tmp_path) -> None:
    # The starting model's CDF tables fill the fine-tuning model before its checkpoint loads; an
    # evaluation may have resized them since (CompressAI's load_state_dict resizes only empty ones).
    train(tiny(tmp_path / "base", method="adam", steps=4, eval_every=0))
    exported = tmp_path / "base.pth.tar"
    export_checkpoint(tmp_path / "base" / "last.ckpt", exported)
    tuned = tiny(tmp_path / "tuned", init=str(exported), lmbda=0.05, steps=5, eval_every=0)
    train(tuned)
    checkpoint = load_checkpoint(tmp_path / "tuned" / "last.ckpt")
    key = "entropy_bottleneck._quantized_cdf"
    table = checkpoint["model"][key]
    checkpoint["model"][key] = torch.cat([table, torch.zeros_like(table[:, :3])], dim=1)
    torch.save(checkpoint, tmp_path / "tuned" / "last.ckpt")
    resumed = Trainer(replace(tuned, steps=8), resume=load_checkpoint(tmp_path / "tuned" / "last.ckpt"))
    assert torch.equal(resumed.model.state_dict()[key], checkpoint["model"][key])
    assert train(replace(tuned, steps=8), resume=tmp_path / "tuned" / "last.ckpt")["steps"] == 8
