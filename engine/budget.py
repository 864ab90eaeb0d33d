"""--time_budget MINUTES: fit the number of epochs to a wall-clock budget, so a recipe holds its time on a slow
machine (or a busy one) and still ends with a fully annealed schedule instead of being cut off mid-schedule.

After every epoch the run re-plans: the most epochs (at most --epochs) whose predicted end fits the budget,
from the mean wall time of the last few epochs (training, checkpoint, logging) and of one evaluation (timed
once one has run; before that, estimated from the share of forward passes). When the plan changes, schedules
whose shape depends on the run's length (cosine, onecycle, poly) are rebuilt for the new length and moved to
the current iteration, so the learning rate from then on is exactly that of a run started with --epochs E;
the others (step, multistep, exponential, multiplicative, plateau, cyclic, cosine_restarts, constant) just
end sooner.
Once the planned last epoch has trained the run ends, even if the machine sped up: its schedule has annealed.
The epoch count then depends on the machine's speed: a budgeted run is not reproducible across machines.
"""
import dataclasses
import time
import warnings

from engine.scheduler import build_scheduler

LENGTH_DEPENDENT = ("cosine", "onecycle", "poly")


def evaluations_between(done, epochs, eval_interval):
    """Epochs in [done, epochs] (1-based) that end with an evaluation: every eval_interval-th (0: none) and the last."""
    return sum(1 for k in range(max(done, 1), epochs + 1) if k == epochs or (eval_interval and k % eval_interval == 0))


def plan_epochs(budget_s, elapsed_s, done, max_epochs, epoch_s, eval_s, eval_interval, final_extra_s=0.0,
                cost=None):
    """The largest E in [done, max_epochs] with
    elapsed_s + epoch_s * sum(cost(k, E), k = done+1..E) + eval_s * evaluations_between(done, E) + final_extra_s
    <= budget_s, where `done` epochs have trained and epoch `done`'s evaluation has not run yet. cost(k, E) is
    epoch k's (1-based) time in a run of E epochs relative to epoch_s (1 when None: every epoch costs epoch_s;
    --prog_resize makes early epochs cheaper). E = done (stop now) when not even that fits."""
    cost = cost or (lambda k, e: 1.0)
    best = done
    for e in range(done + 1, max_epochs + 1):
        train_s = epoch_s * sum(cost(k, e) for k in range(done + 1, e + 1))
        need = elapsed_s + train_s + eval_s * evaluations_between(done, e, eval_interval)
        if need + final_extra_s <= budget_s:
            best = e
        else:
            break  # the need grows with e (a longer --prog_resize ramp saves less than one more epoch costs)
    return best


class TimeBudget:
    """Wall-clock bookkeeping for one run. `prior_s` is the wall time of the run before a --resume."""

    def __init__(self, minutes, max_epochs, eval_interval, eval_share, *, start, prior_s=0.0, extra_evals=0,
                 recent=3):
        self.budget_s = 60.0 * minutes
        self.max_epochs = max_epochs
        self.eval_interval = eval_interval
        self.eval_share = eval_share  # estimated evaluation time / epoch time, until one is timed
        self.prior_s = prior_s
        self.extra_evals = extra_evals  # evaluation rounds after the last epoch's (a separate test split)
        self.recent = recent
        self.start = start  # time.perf_counter() when the run began
        self.mark = start  # end of the last planned epoch; begin() moves it to the start of the loop
        self.epoch_s = []  # wall seconds per epoch, evaluations excluded
        self.eval_s = None  # wall seconds of the last evaluation round
        self.pending_eval = 0.0

    def elapsed(self):
        return self.prior_s + time.perf_counter() - self.start

    def begin(self):
        """The epoch loop starts now: setup time counts against the budget but not as an epoch's time."""
        self.mark = time.perf_counter()

    def add_eval(self, seconds):
        """An evaluation round (raw + EMA model) took `seconds`; it is not part of the epoch time."""
        self.eval_s = seconds
        self.pending_eval += seconds

    def plan(self, done, done_cost=1.0, cost=None):
        """Call when epoch `done` (1-based) has trained, before its evaluation: the epoch count to run to.
        done_cost: that epoch's cost relative to a full one; cost(k, E): as plan_epochs (both from
        --prog_resize; the recent epochs' times are scaled to full-size epochs with done_cost)."""
        now = time.perf_counter()
        self.epoch_s.append((now - self.mark - self.pending_eval) / done_cost)
        self.mark, self.pending_eval = now, 0.0
        recent = self.epoch_s[-self.recent:]
        epoch_s = sum(recent) / len(recent)
        eval_s = self.eval_s if self.eval_s is not None else self.eval_share * epoch_s
        return plan_epochs(self.budget_s, self.elapsed(), done, self.max_epochs, epoch_s, eval_s,
                           self.eval_interval, self.extra_evals * eval_s, cost)


def replan_schedule(sched, optimizer, cfg, steps_per_epoch, epochs):
    """The run's schedule rebuilt for `epochs` epochs and advanced to the iteration `sched` has reached.

    Schedules that do not depend on the run's length are returned as they are. Each param group's lr is
    first reset to its peak (kept by build_scheduler) because build_scheduler reads the peaks from the
    optimizer."""
    if cfg.scheduler not in LENGTH_DEPENDENT:
        return sched
    warmup_iters = round(cfg.warmup_epochs * steps_per_epoch)
    if epochs * steps_per_epoch <= max(warmup_iters, sched.iteration):
        return sched  # no schedule left to stretch: the run stops at its current epoch
    for group, peak in zip(optimizer.param_groups, sched.peaks):
        group["lr"] = peak
    new = build_scheduler(optimizer, dataclasses.replace(cfg, epochs=epochs), steps_per_epoch)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": replaying, not training
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(sched.iteration):
            new.step()
    return new


def eval_share(n_val_batches, n_train_batches, views, with_ema):
    """Estimated evaluation time / training-epoch time: a forward pass costs about a third of a training step."""
    return n_val_batches * views * (2 if with_ema else 1) / (3.0 * max(1, n_train_batches))
