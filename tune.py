"""Hyper-parameter search over train.py's flags with Optuna: TPE sampling, pruning on validation accuracy, one
study shared by any number of workers, and a best.yaml to train from.

    python tune.py --space configs/tune_fmnist.yaml --n_trials 40 --val_ratio 0.1 --epochs 4
    python tune.py --report --output_dir runs/tune_fmnist       # trials.csv, plots, report.md and best.yaml again
    python train.py --config runs/tune_fmnist/best.yaml         # train the best trial's recipe
    pip install optuna-dashboard; optuna-dashboard sqlite:///runs/tune_fmnist/study.db   # watch it in a browser

SPACE.yaml maps train.py flags to `{low, high[, log: true]}` (floats), `{low, high, step}` (ints) or `{choices:
[...]}` (methods, and on/off tricks: `ema: {choices: [true, false]}`, `random_erasing: {choices: [0, 0.25]}`), all
checked against train.py's flags and config.RANGES first. Flags after tune.py's own (`--config FILE` too) are fixed
for every trial; --seed seeds the sampler and every trial's training. Tune on a split of train (`--val_ratio 0.1`),
not on the test split that Fashion-MNIST and CIFAR-10 validate on by default.

A trial is a subprocess `python train.py FIXED SAMPLED --seed S --output_dir DIR/trial_NNNN [--time_budget M]`:
tune.py follows the metrics.csv that train.py rewrites atomically after every epoch, reports each evaluated epoch's
accuracy (the better of val_acc and val_acc_ema; the objective is the final one; trials evaluate every epoch
unless --eval_interval is fixed) to the pruner, and stops a pruned trial with SIGTERM (train.py exits 143
keeping last.pt). Not train.main in process: train.py needs no per-epoch hook, a crash, NaN or leaked memory
stays in its trial, and no global state (seeds, threads, log handlers) carries over, for ~2 s of start-up per
trial. A failed trial keeps train.py's `error: ...` line as its reason.

--storage takes any URL of Optuna's RDB storage (default sqlite:///DIR/study.db). The same command on several
machines with one `--storage postgresql+psycopg2://...` fills one study; a rerun resumes it. Together they run
exactly --n_trials: complete, pruned, failed and running trials count, those cut short by stopping tune.py or by a
worker's death run again. Optuna has no atomic "count, then ask", so workers take turns under a lock that any RDB
provides: creating a study named NAME.lock fails while one exists.
"""
import argparse
import collections
import contextlib
import csv
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import optuna
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState

import config
from models import MODELS
from reporting.environment import write_csv
from utils.errors import UserError, run_cli
from utils.logger import setup_logging
from utils.outputs import open_dir

log = logging.getLogger("tune")
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
# set by tune.py for each trial, or not about training: never searched; of these only --config may be fixed
RUN_FLAGS = {"output_dir", "seed", "config", "resume", "overwrite", "eval_only", "ckpt", "plot_lr", "preview_aug"}
NAMED_CHOICES = {"opt": config.OPTIMIZERS, "scheduler": config.SCHEDULERS, "init": config.INITS,
                 "dataset": config.DATASETS, "model": MODELS}
PRUNERS = {"median": optuna.pruners.MedianPruner, "halving": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}
POLL_S, HEARTBEAT_S, LOCK_STALE_S = 0.5, 10, 60


def fixed_flags(train_argv, trial_minutes):
    """The fixed train.py flags checked as train.py checks them: (namespace, names given on the command line or
    in --config, which the space may not search)."""
    probe = config.get_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # the namespace then holds only the flags given
    given = vars(probe.parse_args(train_argv))
    names = set(given) | set(config.load_config_file(given["config"], probe) if "config" in given else ())
    clash = sorted(names & (RUN_FLAGS - {"config"}))
    if clash:
        raise UserError(f"--{clash[0]} is not for a search: tune.py runs each trial in DIR/trial_NNNN; drop it")
    if trial_minutes and "time_budget" in names:
        raise UserError("--trial_minutes sets every trial's --time_budget; drop one of them")
    return config.parse_args(train_argv), names | ({"time_budget"} if trial_minutes else set())


def _check(where, name, action, value):
    """`value` as train.py would take it for flag `name` (type, choices, config.RANGES); returns its kind."""
    kind = "bool" if isinstance(action, config.BoolFlag) else {int: "int", float: "float"}.get(action.type, "str")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = {"bool": kind == "bool" and action.accepts(value), "int": number and isinstance(value, int), "float": number,
          "str": isinstance(value, str)}[kind]
    allowed = action.choices or NAMED_CHOICES.get(name)
    if not ok or (allowed is not None and value not in allowed):
        raise UserError(f"{where}: {value!r} is not " + (f"one of {', '.join(map(str, allowed))}" if allowed else
                        {"bool": getattr(action, "words", ""), "int": "an integer", "float": "a number"}[kind]))
    try:
        config.validate(argparse.Namespace(**{name: value}), config.get_parser())
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return kind


def load_space(path, fixed=()):
    """{flag: {type, low, high, log, step} or {type, choices}} from SPACE.yaml, checked flag by flag."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"space file {path} cannot be read ({str(e).strip().splitlines()[0]}); fix it or the path")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"space file {path} must map train.py flags to ranges, e.g. lr: {{low: 0.01, high: 1}}")
    actions = {a.dest: a for a in config.get_parser()._actions if a.dest != "help"}
    space = {}
    for key, spec in raw.items():
        name, where = str(key).replace("-", "_"), f"space file {path}: {key}"
        action = actions.get(name)
        if action is None:
            raise UserError(f"{where}: not a train.py flag (see python train.py --help)")
        if name in RUN_FLAGS or name in fixed or action.nargs not in (None, 0):
            raise UserError(f"{where}: cannot be searched (" + ("set by tune.py" if name in RUN_FLAGS else
                            "also fixed on the command line or in --config" if name in fixed else "a list") + ")")
        keys = set(spec) if isinstance(spec, dict) else set()
        if keys != {"choices"} and not {"low", "high"} <= keys <= {"low", "high", "log", "step"}:
            raise UserError(f"{where}: give {{low, high[, log, step]}} or {{choices: [...]}}")
        if keys == {"choices"}:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise UserError(f"{where}: choices must be a non-empty list")
            space[name] = {"type": [_check(where, name, action, v) for v in spec["choices"]][0],
                           "choices": spec["choices"]}
            continue
        low, high, log_, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
        kind = {int: "int", float: "float"}.get(action.type)
        for bound in (low, high, step):
            if kind and bound is not None and (isinstance(bound, bool) or not isinstance(
                    bound, int if kind == "int" else (int, float))):
                raise UserError(f"{where}: {bound!r} is not {'an integer' if kind == 'int' else 'a number'}")
        if kind is None or isinstance(action, config.BoolFlag):
            raise UserError(f"{where}: not a number flag; search it with {{choices: [...]}}")
        if not low < high:
            raise UserError(f"{where}: empty range: low {low} must be below high {high}")
        if log_ not in (True, False) or (log_ and (low <= 0 or step is not None)) or (step is not None and step <= 0):
            raise UserError(f"{where}: log (true/false) needs low > 0 and no step; a step must be > 0")
        for bound in (low, high):
            _check(where, name, action, bound)
        space[name] = {"type": kind, "low": low, "high": high, "log": log_, "step": step}
    return space


def suggest(trial, name, spec):
    if "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], step=spec["step"] or 1, log=spec["log"])
    return trial.suggest_float(name, spec["low"], spec["high"], step=spec["step"], log=spec["log"])


def to_argv(values, space):
    """train.py flags for sampled values: booleans as --x / --no_x (`auto` as --x auto), floats exactly (repr
    round-trips)."""
    return [token for name, v in values.items() for token in (
        [f"--{name}" if v else f"--no_{name}"] if space[name]["type"] == "bool" and isinstance(v, bool)
        else [f"--{name}", repr(v) if isinstance(v, float) else str(v)])]


def open_storage(url):
    """Optuna's RDB storage at `url`, with heartbeats: the running trial of a worker that died is marked failed."""
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat_interval is experimental
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=6 * HEARTBEAT_S)
        except Exception as e:  # a bad URL, a missing driver, an unreachable server or folder all end here
            error = e
            if not isinstance(e, sqlalchemy.exc.DBAPIError):
                break
            time.sleep(random.uniform(0.2, 1.0))  # workers started together race to create the tables: retry
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise UserError(f"cannot open --storage {url.split('@')[-1]} ({first}); check the URL, server and driver")


def open_study(storage, name, pruner, meta):
    """Create the study, or load it (a rerun, another worker) after checking that the same command made it."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner,
                                load_if_exists=True)
    meta, saved = json.loads(json.dumps(meta)), study.user_attrs
    clash = [k for k in meta if k in saved and saved[k] != meta[k]]
    if clash:
        raise UserError(f"study {name} was started with another {clash[0]} ({saved[clash[0]]}); rerun it with the "
                        "same train.py flags, space, --seed and --trial_minutes, or pick another --study_name")
    for k, v in meta.items():
        study.set_user_attr(k, v)
    return study


def counts(t):
    """Whether trial `t` uses up one of the N: running, or finished by its worker; not one cut short by stopping
    tune.py, nor one whose worker died (the heartbeat failed it, so it has no reason)."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or (
        t.state == TrialState.FAIL and "reason" in t.user_attrs and not t.user_attrs.get("interrupted"))


@contextlib.contextmanager
def study_lock(storage, name):
    """Held by one worker at a time; a lock left by a worker killed while holding it is broken after a minute."""
    seen = {}
    while True:
        try:
            lock = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], f"{name}.lock")
            break
        except optuna.exceptions.DuplicatedStudyError:
            with contextlib.suppress(KeyError):
                held = storage.get_study_id_from_name(f"{name}.lock")
                if time.monotonic() - seen.setdefault(held, time.monotonic()) > LOCK_STALE_S:
                    storage.delete_study(held)
            time.sleep(random.uniform(0.05, 0.2))
    try:
        yield
    finally:
        storage.delete_study(lock)


def claim_trial(study, storage, n_trials):
    """A new trial, or None once n_trials count in the study (this worker's and every other's)."""
    with study_lock(storage, study.study_name), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fail_stale_trials is experimental; ask() outside optimize() warns
        optuna.storages.fail_stale_trials(study)
        if sum(map(counts, study.get_trials(deepcopy=False))) >= n_trials:
            return None
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)  # from now on a worker that dies leaves no RUNNING trial
        return trial


def score(row, prefix=""):
    """The accuracy a trial is judged by: the better of the raw and the EMA weights'."""
    return max(float(row[k]) for k in (f"{prefix}val_acc", f"{prefix}val_acc_ema") if row.get(k) not in (None, ""))


def report_epochs(trial, run_dir, reported):
    """Report the evaluated epochs in metrics.csv not reported yet; returns the last one reported now, or 0."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return 0
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_acc") and int(r["epoch"]) not in reported]
    for r in rows:
        trial.report(score(r), int(r["epoch"]))
        reported.add(int(r["epoch"]))
    return int(rows[-1]["epoch"]) if rows else 0


def error_line(path, returncode):
    """train.py's `error: ...` line (else the last line it wrote) and its exit code."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return f"{(errors or lines or ['no output'])[-1]} (exit {returncode})"


def run_trial(study, trial, storage, cmd, run_dir, epochs):
    """Run one trial's train.py, pruning it before its last epoch (`epochs`) if the pruner says so; tell the study
    how it ended (COMPLETE, PRUNED, or FAIL with a reason) and return the finished trial."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        trial.set_user_attr("reason", f"{run_dir} is not empty (another study in this --output_dir?)")
        return study.tell(trial, state=TrialState.FAIL)
    console = os.path.join(open_dir(run_dir), "console.log")
    with open(console, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    reported, beat = set(), 0.0
    try:
        while proc.poll() is None:
            if time.monotonic() - beat > HEARTBEAT_S:
                storage.record_heartbeat(trial._trial_id)
                beat = time.monotonic()
            # after its last epoch a trial is as good as complete: the pruner saves nothing by stopping it
            if 0 < report_epochs(trial, run_dir, reported) < epochs and trial.should_prune():
                proc.send_signal(signal.SIGTERM)  # train.py exits 143, keeping last.pt
                proc.wait()
                return study.tell(trial, state=TrialState.PRUNED)
            time.sleep(POLL_S)
    except BaseException as e:  # tune.py stopped (Ctrl-C, SIGTERM): stop the trial too; a rerun runs it again
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        trial.set_user_attr("reason", "interrupted (" + (signal.Signals(e.signum).name if hasattr(e, "signum")
                                                          else type(e).__name__) + ")")
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        raise
    report_epochs(trial, run_dir, reported)  # the epochs since the last poll
    summary = os.path.join(run_dir, "summary.json")
    if proc.returncode == 0 and os.path.exists(summary):
        with open(summary) as f:
            return study.tell(trial, score(json.load(f), prefix="final_"))
    trial.set_user_attr("reason", error_line(console, proc.returncode))
    return study.tell(trial, state=TrialState.FAIL)


def optimize(study, storage, n_trials, out_dir):
    """Run trials until n_trials count in the study; the flags come from the study's user attrs."""
    meta = study.user_attrs
    space, seed = meta["space"], meta["seed"]
    budget = ["--time_budget", str(meta["trial_minutes"])] if meta["trial_minutes"] else []
    while (trial := claim_trial(study, storage, n_trials)) is not None:
        # trial k samples with seed S + k: workers started together draw different points, one worker repeats
        study.sampler = optuna.samplers.TPESampler(seed=seed + trial.number, constant_liar=True)
        flags = to_argv({name: suggest(trial, name, spec) for name, spec in space.items()}, space)
        run_dir = os.path.join(out_dir, f"trial_{trial.number:04d}")
        started = time.monotonic()
        t = run_trial(study, trial, storage, [sys.executable, TRAIN, *meta["train_argv"], *flags, "--seed",
                                              str(seed), "--output_dir", run_dir, *budget], run_dir,
                      epochs=config.parse_args([*meta["train_argv"], *flags]).epochs)
        log.info(f"trial {t.number} {t.state.name} {t.value if t.value is not None else t.user_attrs['reason']} "
                 f"in {time.monotonic() - started:.0f} s: {' '.join(flags)}")


def write_report(study, out_dir):
    """trials.csv, accuracy_by_trial.png (complete trials), accuracy_by_epoch.png (every trial, as the pruner saw
    it), param_importances.png, best.yaml and report.md of the study as it stands; returns a summary dict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meta, space = study.user_attrs, study.user_attrs["space"]
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    lost = "its worker stopped (no heartbeat); a rerun runs this slot again"
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, **{k: t.params.get(k) for k in space},
             "epochs": len(t.intermediate_values), "duration_s": t.duration and round(t.duration.total_seconds(), 1),
             "reason": t.user_attrs.get("reason", lost if t.state == TrialState.FAIL else "")} for t in trials]
    write_csv(os.path.join(out_dir, "trials.csv"), rows)  # a pruned trial's value: where it stopped
    done = [r for r in rows if r["state"] == "COMPLETE"]
    plots = []
    for name, plot in (("accuracy_by_trial.png", optuna.visualization.matplotlib.plot_optimization_history),
                       ("accuracy_by_epoch.png", optuna.visualization.matplotlib.plot_intermediate_values),
                       ("param_importances.png", optuna.visualization.matplotlib.plot_param_importances)):
        try:
            if name == "param_importances.png" and len(done) < 2:
                raise ValueError("fewer than 2 complete trials")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is experimental
                fig = plot(study).figure
            tmp = os.path.join(out_dir, f"{name}.tmp{os.getpid()}.png")  # workers sharing DIR may write at once
            fig.savefig(tmp, dpi=90, bbox_inches="tight")
            plt.close(fig)
            os.replace(tmp, os.path.join(out_dir, name))
            plots.append(name)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log.info(f"{name}: skipped ({e})")
    states = collections.Counter(r["state"].lower() for r in rows)
    budget = ["--time_budget", str(meta["trial_minutes"])] if meta["trial_minutes"] else []
    fixed = [*meta["train_argv"], "--seed", str(meta["seed"]), *budget]
    md = [f"# Study {study.study_name}", "", f"{len(rows)} trials ({dict(states)}), each `python train.py "
          f"{' '.join(fixed)}` plus its sampled flags, judged by the final validation accuracy.", ""]
    best = study.best_trial if done else None
    if best is not None:  # best.yaml: the fixed and the best sampled flags, resolved as train.py's config.yaml
        tmp = os.path.join(out_dir, f"best.yaml.tmp{os.getpid()}")
        config.save_config(config.parse_args([*fixed, *to_argv(best.params, space)]), tmp)
        os.replace(tmp, os.path.join(out_dir, "best.yaml"))
        md += [f"Best: trial {best.number}, {best.value:.4f}, with `{' '.join(to_argv(best.params, space))}`: "
               f"`python train.py --config {os.path.join(out_dir, 'best.yaml')}`.", ""]
    md += [f"- trial {r['number']} {r['state'].lower()}: {r['reason']}" for r in rows if r["reason"]]
    md += ["", *[f"![{name[:-4]}]({name})" for name in plots]]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    log.info(f"study {study.study_name}: {dict(states)}" + (f"; best trial {best.number}: {best.value:.4f}"
                                                            if best else "") + f" -> {out_dir}/report.md")
    return {"study_name": study.study_name, "states": dict(states), "best_value": best and best.value,
            "best_params": best and best.params}


def get_parser():
    p = config.tool_parser("Search train.py's flags with Optuna. Flags after these are train.py flags, fixed for "
                           "every trial.", usage="python tune.py --space SPACE.yaml --n_trials N [options] "
                           "[train.py flags ...]")
    p.allow_abbrev = False  # a flag not spelled out in full is a train.py flag
    p.add_argument("--space", help="YAML: train.py flag -> {low, high[, log, step]} or {choices: [...]}")
    p.add_argument("--n_trials", type=int, help="trials in the study in the end, over all workers and reruns")
    p.add_argument("--trial_minutes", type=float, default=0.0, help="every trial's --time_budget (0 = off)")
    p.add_argument("--storage", help="Optuna RDB storage URL (default: sqlite:///DIR/study.db)")
    p.add_argument("--study_name", help="default: the space file's name (with --report: the storage's only study)")
    p.add_argument("--output_dir", metavar="DIR", help="trials, report and best.yaml (default: runs/<study_name>)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler and every trial's train.py --seed")
    p.add_argument("--pruner", default="median", choices=tuple(PRUNERS), help="fed each evaluated epoch")
    p.add_argument("--report", action=config.BoolFlag, help="only write the report of an existing study")
    return p


def main(argv=None):
    args, train_argv = get_parser().parse_known_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.report:  # from the storage alone: the trial folders may be on other machines
        if train_argv:
            raise UserError(f"--report takes no train.py flags (got {' '.join(train_argv)}); they are in the study")
        if args.storage is None and not os.path.isfile(os.path.join(args.output_dir or "", "study.db")):
            raise UserError("--report reads DIR/study.db: pass the --output_dir of a study, or its --storage")
        storage = open_storage(args.storage or f"sqlite:///{args.output_dir}/study.db")
        names = [n for n in optuna.get_all_study_names(storage) if not n.endswith(".lock")]
        name = args.study_name or (names[0] if len(names) == 1 else None)
        if name not in names:
            raise UserError(f"pass --study_name, one of: {', '.join(names) or '(none)'}")
        study = optuna.load_study(study_name=name, storage=storage)
        if "space" not in study.user_attrs:
            raise UserError(f"study {name} was not made by tune.py; look at it with optuna-dashboard")
        out_dir = open_dir(args.output_dir or os.path.join("runs", name))
        setup_logging(os.path.join(out_dir, "tune.log"))
        return write_report(study, out_dir)
    if args.space is None or args.n_trials is None:
        raise UserError("--space SPACE.yaml and --n_trials N are required (or --report --output_dir DIR)")
    if args.n_trials < 1:
        raise UserError(f"--n_trials must be at least 1 (got {args.n_trials})")
    if not 0 <= args.trial_minutes < math.inf:
        raise UserError(f"--trial_minutes must be minutes > 0, or 0 for off (got {args.trial_minutes:g})")
    fixed, given = fixed_flags(train_argv, args.trial_minutes)
    space = load_space(args.space, given)
    if "eval_interval" not in given and "eval_interval" not in space:
        train_argv = [*train_argv, "--eval_interval", "1"]  # the pruner is fed every epoch's validation accuracy
    name = args.study_name or os.path.splitext(os.path.basename(args.space))[0]
    out_dir = args.output_dir or os.path.join("runs", name)
    if args.storage is None:
        open_dir(out_dir)  # the default storage lives there; another one is opened before anything is written
    storage = open_storage(args.storage or f"sqlite:///{out_dir}/study.db")
    setup_logging(os.path.join(open_dir(out_dir), "tune.log"))
    if fixed.dataset in ("fashion_mnist", "cifar10") and not (fixed.val_ratio or fixed.kfold):
        log.warning("trials are judged on the test split; pass --val_ratio 0.1 to tune on a split of train")
    study = open_study(storage, name, PRUNERS[args.pruner](), {"train_argv": train_argv, "space": space,
                                                                "seed": args.seed, "trial_minutes": args.trial_minutes})
    optimize(study, storage, args.n_trials, out_dir)
    return write_report(study, out_dir)


if __name__ == "__main__":
    run_cli(main)
