"""--time_budget: the epoch plan against hand-computed arithmetic, a re-planned schedule against a fresh run of
the planned length, and an end-to-end run that stops inside its budget with a fully annealed schedule."""
import json
import math
import re
import time

import pytest
import torch
from conftest import QUICK, needs_fmnist

import config
import train
from engine import budget as budget_mod
from engine.budget import TimeBudget, evaluations_between, plan_epochs, replan_schedule
from engine.scheduler import ScheduleOptions, build_scheduler, lr_at_steps
from utils.errors import UserError


def test_evaluations_between_counts_interval_and_last():
    assert evaluations_between(1, 7, 2) == 4  # epochs 2, 4, 6 and the last, 7
    assert evaluations_between(3, 8, 4) == 2  # 4 and 8
    assert evaluations_between(5, 5, 3) == 1  # the last epoch is always evaluated


def test_plan_epochs_by_hand():
    # need(E) = 10 + (E - 1) * 10 + 5 * #evals(1..E), interval 2:
    # E=8: evals 2,4,6,8 -> 10 + 70 + 20 = 100 <= 100; E=9: 2,4,6,8,9 -> 10 + 80 + 25 = 115 > 100
    assert plan_epochs(100, 10, 1, 20, 10, 5, 2) == 8
    assert plan_epochs(100, 10, 1, 5, 10, 5, 2) == 5  # capped by --epochs
    assert plan_epochs(100, 99, 1, 20, 10, 5, 2) == 1  # nothing more fits: stop after this epoch
    assert plan_epochs(100, 10, 1, 20, 10, 5, 2, final_extra_s=10) == 7  # E=8 no longer fits with +10 s


def test_time_budget_plans_from_recent_epochs_and_the_timed_evaluation(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: clock[0])
    b = TimeBudget(1.0, 100, 1, eval_share=0.5, start=0.0, prior_s=0.0, recent=2)  # 60 s
    clock[0] = 2.0
    b.begin()  # 2 s of setup count against the budget, not as an epoch
    clock[0] = 6.0  # epoch 1 took 4 s; estimated eval 0.5 * 4 = 2 s per epoch
    # E: 6 + (E - 1) * 4 + 2 * E <= 60 -> 6E <= 58 -> E = 9
    assert b.plan(1) == 9
    b.add_eval(1.0)
    clock[0] = 6.0 + 1.0 + 8.0  # epoch 2 took 8 s after a 1 s evaluation; recent mean (4 + 8) / 2 = 6 s
    # E: 15 + (E - 2) * 6 + 1 * (E - 1) <= 60 -> 7E <= 58 -> E = 8
    assert b.plan(2) == 8


@pytest.mark.parametrize("name,flags", [
    ("cosine", ["--warmup_epochs", "1.5", "--min_lr", "0.001"]),
    ("onecycle", ["--warmup_epochs", "0"]),
    ("poly", ["--warmup_epochs", "0.5"]),
])
def test_replanned_schedule_continues_as_a_fresh_run_of_the_new_length(name, flags):
    spe, done_iters = 7, 17
    argv = ["--scheduler", name, "--epochs", "20", "--lr", "0.2", *flags]
    args = config.options(ScheduleOptions, config.parse_args(argv))
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.8}], lr=0.2)
    sched = build_scheduler(opt, args, spe)
    for _ in range(done_iters):
        opt.step()
        sched.step()
    sched = replan_schedule(sched, opt, args, spe, 9)
    assert args.epochs == 20  # the flags are left as they were
    fresh = config.parse_args(["--scheduler", name, "--epochs", "9", "--lr", "0.2", *flags])
    want_a, want_b = lr_at_steps(fresh, spe, 9 * spe), lr_at_steps(fresh, spe, 9 * spe, lr=0.8)
    for i in range(done_iters, 9 * spe):
        assert sched.get_last_lr() == pytest.approx([want_a[i], want_b[i]], rel=1e-9, abs=1e-12), i
        opt.step()
        sched.step()


def test_length_independent_schedules_are_kept():
    argv = ["--scheduler", "step", "--step_size", "2", "--epochs", "10"]
    args = config.options(ScheduleOptions, config.parse_args(argv))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = build_scheduler(opt, args, 3)
    assert replan_schedule(sched, opt, args, 3, 4) is sched


@needs_fmnist
def test_budgeted_run_stops_in_time_with_an_annealed_schedule(tmp_path):
    out = tmp_path / "run"
    quick = list(QUICK)  # its --epochs 1 is overridden by the --epochs given after it
    t0 = time.perf_counter()
    train.main(config.parse_args([*quick, "--epochs", "200", "--time_budget", "0.3", "--eval_interval", "3",
                                  "--output_dir", str(out)]))
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    assert 1 < s["planned_epochs"] == s["epochs"] < 200 and s["time_budget_minutes"] == 0.3
    assert wall < 0.3 * 60 + 5  # the plan aims at the budget; a few seconds' slack for the final test/summary
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["metrics"]["planned_epochs"] == s["epochs"]
    # the cosine schedule (no warmup) was fitted to the planned epochs: it ends at lr 0, or near it when a
    # machine that slowed down made the last plan stop the run a few epochs before the previous plan's end
    # (ended k epochs early out of e, it stops at 0.1 * (1 + cos(pi * (e - k) / e)): 0.0036 for k = 3, e = 35);
    # unfitted, it would still follow the 200 epochs asked for: 0.1 * (1 + cos(pi * e / 200)), 0.17 at e = 40
    e = s["epochs"]
    lr = ckpt["optimizer"]["param_groups"][0]["lr"]
    assert lr <= 0.1 * (1 + math.cos(math.pi * max(e - 3, 0) / e)) + 1e-9, (lr, e)


def test_a_run_that_reached_its_planned_end_is_not_extended(tmp_path, monkeypatch):
    # a budget that always finds room for one more epoch (a machine that keeps speeding up): epoch 1 plans 2,
    # and after epoch 2, the plan's last, the run ends with its schedule annealed rather than re-opening it
    monkeypatch.setattr(train.TimeBudget, "plan", lambda self, done, done_cost=1.0, cost=None: done + 1)
    out = tmp_path / "run"
    quick = list(QUICK)  # its --epochs 1 is overridden by the --epochs given after it
    train.main(config.parse_args([*quick, "--epochs", "50", "--time_budget", "5", "--output_dir", str(out)]))
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs"] == s["planned_epochs"] == 2
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_budget_with_swa_and_negative_budgets_are_refused():
    for flags, fragment in ((["--swa", "--swa_start", "2", "--time_budget", "1"], "--time_budget cannot move"),
                            (["--time_budget", "-1"], "--time_budget -1: must be in [0, inf)")):
        with pytest.raises(UserError, match=re.escape(fragment)):
            train.check_args(config.parse_args(["--epochs", "4", *flags]))
