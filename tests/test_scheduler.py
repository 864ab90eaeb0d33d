"""Learning-rate schedules against their closed forms, resume, plateau, and the --plot_lr figure."""
import io
import math

import pytest
import torch

import config
from engine.scheduler import SCHEDULERS, build_scheduler, lr_at_steps, plot_lr
from utils.errors import UserError


def _args(*flags):
    return config.parse_args(list(flags))


def _needs_no_warmup(name):
    return name in ("onecycle", "cyclic")


def _flags_for(name):
    """Flags under which every schedule changes within a 6-epoch run of 4 steps per epoch."""
    return ["--scheduler", name, "--epochs", "6", "--lr", "0.1", "--min_lr", "0.001",
            "--warmup_epochs", "0" if _needs_no_warmup(name) else "1", "--warmup_lr_init", "0.01",
            "--step_size", "2", "--milestones", "3", "5", "--restart_epochs", "2", "--cyclic_step_epochs", "1",
            "--plateau_patience", "1", "--gamma", "0.5"]


def test_names_match_config():
    assert SCHEDULERS == config.SCHEDULERS


def test_warmup_then_cosine_closed_form():
    # 5 epochs of 10 steps; warmup 1.5 epochs = 15 iterations from warmup_lr_init to lr, then cosine to min_lr
    # over the 35 remaining iterations:
    #   lr(i) = init + (peak - init) * i / W                                for i < W
    #   lr(i) = min_lr + (peak - min_lr) * (1 + cos(pi * (i - W) / (N - W))) / 2   for i >= W
    a = _args("--epochs", "5", "--lr", "0.4", "--warmup_epochs", "1.5", "--warmup_lr_init", "0.01",
              "--min_lr", "0.001")
    peak, init, lo, W, N = 0.4, 0.01, 0.001, 15, 50
    lrs = lr_at_steps(a, 10, N)
    for i in (0, 1, 7, 14, 15, 16, 30, 42, 49):
        if i < W:
            want = init + (peak - init) * i / W
        else:
            want = lo + (peak - lo) * (1 + math.cos(math.pi * (i - W) / (N - W))) / 2
        assert lrs[i] == pytest.approx(want, rel=1e-9, abs=1e-12), i


def test_every_param_group_follows_the_schedule():
    a = _args("--epochs", "3", "--lr", "0.2", "--warmup_epochs", "1")
    params = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt = torch.optim.SGD([{"params": params[:1], "weight_decay": 1e-4}, {"params": params[1:], "weight_decay": 0}],
                          lr=0.2)
    sched = build_scheduler(opt, a, 4)
    want = lr_at_steps(a, 4, 12)
    for i in range(12):
        assert sched.get_last_lr() == pytest.approx([want[i], want[i]], rel=1e-12)
        opt.step()
        sched.step()


def _run(name, n_steps, metrics, start=None):
    """Steps a fresh optimizer+schedule (4 steps/epoch); `start` = (optimizer sd, schedule sd) to resume from."""
    a = _args(*_flags_for(name))
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=a.lr, momentum=0.9)
    sched = build_scheduler(opt, a, 4)
    done = 0
    if start is not None:
        opt.load_state_dict(start[0])
        sched.load_state_dict(start[1])
        done = sched.iteration
    lrs = []
    for i in range(done, done + n_steps):
        lrs.append(sched.get_last_lr()[0])
        p.grad = torch.full_like(p, 0.1)
        opt.step()
        sched.step()
        if (i + 1) % 4 == 0:
            sched.step_epoch(metrics[(i + 1) // 4 - 1])
    return lrs, opt, sched


@pytest.mark.parametrize("name", SCHEDULERS)
def test_resume_mid_schedule_continues_the_same_sequence(name):
    metrics = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6]  # plateau: one improvement, then none
    full, _, _ = _run(name, 24, metrics)
    first, opt, sched = _run(name, 10, metrics)  # stop mid-epoch, inside the main schedule
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the checkpoint contract
    rest, _, _ = _run(name, 14, metrics, start=(ckpt["optimizer"], ckpt["scheduler"]))
    assert first + rest == pytest.approx(full, rel=1e-12, abs=1e-15)
    assert len(set(round(x, 12) for x in full)) > 2, "the schedule should change over this run"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_builds_and_runs(name):
    lrs = lr_at_steps(_args(*_flags_for(name)), 4, 24)
    assert all(math.isfinite(x) and 0 <= x <= 0.1 + 1e-12 for x in lrs)


def test_plateau_reduces_after_its_patience():
    a = _args("--scheduler", "plateau", "--epochs", "20", "--lr", "0.1", "--warmup_epochs", "0",
              "--plateau_patience", "2", "--plateau_factor", "0.5")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, a, 3)
    for _ in range(3):
        opt.step()
        sched.step()  # per-iteration steps do not move plateau
    assert sched.get_last_lr() == [0.1]
    sched.step_epoch(0.8)          # best so far
    sched.step_epoch(0.8)          # 1 epoch without improvement
    sched.step_epoch(0.7)          # 2 (mode="max": lower accuracy is worse)
    assert sched.get_last_lr() == [0.1]
    sched.step_epoch(0.8)          # 3 > patience 2 -> reduce
    assert sched.get_last_lr() == pytest.approx([0.05])
    for m in (0.81, 0.82, 0.83, 0.84):  # improving every epoch: no reduction
        sched.step_epoch(m)
    assert sched.get_last_lr() == pytest.approx([0.05])


def test_plateau_with_warmup_warms_up_per_iteration_then_watches_epochs():
    a = _args("--scheduler", "plateau", "--epochs", "10", "--lr", "0.1", "--warmup_epochs", "2",
              "--warmup_lr_init", "0", "--plateau_patience", "0", "--plateau_factor", "0.1")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, a, 4)  # warmup = 8 iterations
    seen = []
    for i in range(16):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        if (i + 1) % 4 == 0:
            sched.step_epoch(0.5)  # never improves; epochs ending inside warmup are not counted
    assert seen[:9] == pytest.approx([0.1 * i / 8 for i in range(8)] + [0.1])
    # epoch 2 ends at the end of warmup: first counted metric (best); epoch 3: worse-or-equal -> patience 0 cut
    assert seen[9:] == pytest.approx([0.1] * 3 + [0.01] * 4)
    assert sched.get_last_lr() == pytest.approx([0.001])


def test_onecycle_peaks_at_pct_start():
    # torch's OneCycleLR: lr/div at step 0, lr at step pct*N - 1, lr/(div*final_div) at step N - 1.
    a = _args("--scheduler", "onecycle", "--warmup_epochs", "0", "--epochs", "4", "--lr", "0.5",
              "--onecycle_pct_start", "0.25", "--onecycle_div_factor", "20", "--onecycle_final_div_factor", "100")
    lrs = lr_at_steps(a, 10, 40)
    assert max(range(40), key=lrs.__getitem__) == 9
    assert lrs[9] == pytest.approx(0.5)
    assert lrs[0] == pytest.approx(0.5 / 20)
    assert lrs[39] == pytest.approx(0.5 / 20 / 100)


def test_cyclic_peaks_after_its_half_cycle():
    a = _args("--scheduler", "cyclic", "--warmup_epochs", "0", "--epochs", "4", "--lr", "0.5",
              "--cyclic_base_lr", "0.1", "--cyclic_step_epochs", "1.5")
    lrs = lr_at_steps(a, 4, 16)  # half cycle = 6 iterations: triangle 0.1 -> 0.5 -> 0.1
    assert max(range(16), key=lrs.__getitem__) == 6
    want = [0.1 + 0.4 * (1 - abs(i % 12 - 6) / 6) for i in range(16)]
    assert lrs == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("name", ("onecycle", "cyclic"))
def test_own_warmup_schedules_refuse_warmup_epochs(name):
    with pytest.raises(UserError, match=f"--warmup_epochs does not apply to {name}.*pass --warmup_epochs 0"):
        lr_at_steps(_args("--scheduler", name, "--warmup_epochs", "1"), 4, 4)


def test_step_divides_by_ten_every_thirty_epochs():
    # The seed's rule lr * 0.1 ** (epoch // 30), with 3 steps per epoch and no warmup.
    a = _args("--scheduler", "step", "--step_size", "30", "--gamma", "0.1", "--epochs", "70", "--lr", "0.2",
              "--warmup_epochs", "0")
    lrs = lr_at_steps(a, 3, 210)
    assert lrs == pytest.approx([0.2 * 0.1 ** ((i // 3) // 30) for i in range(210)], rel=1e-9)
    assert lrs[89] == pytest.approx(0.2) and lrs[90] == pytest.approx(0.02)
    # With warmup the decays stay at epochs 30 and 60 (counted from the start of training).
    w = lr_at_steps(_args("--scheduler", "step", "--step_size", "30", "--epochs", "70", "--lr", "0.2",
                          "--warmup_epochs", "2"), 3, 210)
    assert w[6] == pytest.approx(0.2) and w[89] == pytest.approx(0.2)
    assert w[90] == pytest.approx(0.02) and w[179] == pytest.approx(0.02) and w[180] == pytest.approx(0.002)


def test_multistep_milestones_and_inside_warmup_error():
    lrs = lr_at_steps(_args("--scheduler", "multistep", "--milestones", "5", "2.5", "--epochs", "6",
                            "--lr", "1", "--gamma", "0.5", "--warmup_epochs", "1"), 2, 12)
    assert lrs[2:] == pytest.approx([1.0] * 3 + [0.5] * 5 + [0.25] * 2)  # decays at iterations 5 and 10
    with pytest.raises(UserError, match="not after the warmup"):
        lr_at_steps(_args("--scheduler", "multistep", "--milestones", "1", "--warmup_epochs", "2"), 2, 4)


def test_poly_closed_form():
    # lr(i) = min_lr + (peak - min_lr) * (1 - (i - W) / (N - W)) ** power after W warmup iterations.
    a = _args("--scheduler", "poly", "--poly_power", "2", "--epochs", "5", "--lr", "0.3", "--min_lr", "0.01",
              "--warmup_epochs", "1", "--warmup_lr_init", "0")
    lrs = lr_at_steps(a, 8, 40)
    W, N = 8, 40
    want = [0.3 * i / W if i < W else 0.01 + 0.29 * (1 - (i - W) / (N - W)) ** 2 for i in range(N)]
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_exponential_is_gamma_per_epoch_and_restarts_return_to_peak():
    a = _args("--scheduler", "exponential", "--gamma", "0.5", "--epochs", "4", "--lr", "0.8", "--warmup_epochs", "0")
    assert lr_at_steps(a, 5, 20) == pytest.approx([0.8 * 0.5 ** (i / 5) for i in range(20)], rel=1e-9)
    a = _args("--scheduler", "cosine_restarts", "--restart_epochs", "1", "--restart_mult", "2", "--epochs", "7",
              "--lr", "0.8", "--min_lr", "0", "--warmup_epochs", "0")
    lrs = lr_at_steps(a, 4, 28)  # periods of 4, 8, 16 iterations start at 0, 4, 12
    starts = (0, 4, 12)
    assert [lrs[s] for s in starts] == pytest.approx([0.8] * 3)
    assert lrs[2] == pytest.approx(0.4) and lrs[8] == pytest.approx(0.4) and lrs[20] == pytest.approx(0.4)


@pytest.mark.parametrize("spe", [1, 5])
def test_multiplicative_is_multiplicative_lr_per_epoch(spe):
    # The seed: MultiplicativeLR(opt, lambda epoch: G) stepped once per epoch, no warmup. Closed form at epoch e:
    # lr_e = lr * G^e, constant through the epoch; torch's own MultiplicativeLR gives the same values to the bit.
    G, lr, E = 0.7, 0.3, 6
    a = _args("--scheduler", "multiplicative", "--gamma", str(G), "--epochs", str(E), "--lr", str(lr),
              "--warmup_epochs", "0")
    got = lr_at_steps(a, spe, E * spe)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    seed = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda epoch: G)
    for e in range(E):
        assert got[e * spe] == pytest.approx(lr * G ** e, rel=1e-12)
        assert got[e * spe] == opt.param_groups[0]["lr"]  # bit for bit
        assert got[e * spe:(e + 1) * spe] == [got[e * spe]] * spe  # constant within the epoch
        opt.step()
        seed.step()


def test_multiplicative_starts_from_the_peak_after_warmup():
    # 2 warmup epochs of 4 steps from 0 to lr, then lr * G^e in the e-th epoch after warmup
    a = _args("--scheduler", "multiplicative", "--gamma", "0.5", "--epochs", "6", "--lr", "0.4",
              "--warmup_epochs", "2", "--warmup_lr_init", "0")
    got = lr_at_steps(a, 4, 24)
    assert got[:8] == pytest.approx([0.4 * i / 8 for i in range(8)], rel=1e-12, abs=1e-15)
    assert got[8:] == pytest.approx([0.4 * 0.5 ** (i // 4) for i in range(16)], rel=1e-12)


def test_unknown_scheduler_lists_names():
    with pytest.raises(UserError, match="cosine, step, multistep.*constant"):
        lr_at_steps(_args("--scheduler", "linear"), 4, 4)


def test_warmup_longer_than_training_is_an_error():
    with pytest.raises(UserError, match="warmup"):
        lr_at_steps(_args("--epochs", "2", "--warmup_epochs", "2"), 4, 4)


def test_plot_lr_writes_png(tmp_path):
    path = plot_lr(_args("--epochs", "3"), 5, str(tmp_path))
    assert path == str(tmp_path / "lr_schedule.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_onecycle_over_too_few_steps_is_one_line():
    import config
    from engine.scheduler import ScheduleOptions
    from utils.errors import UserError
    args = config.options(ScheduleOptions, config.parse_args(["--scheduler", "onecycle", "--warmup_epochs", "0",
                                                              "--epochs", "2"]))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(UserError, match="leaves no room for its rise and fall"):
        build_scheduler(opt, args, 2)  # 4 steps: torch's OneCycleLR would divide by zero
    build_scheduler(opt, args, 4)  # 8 steps are enough
