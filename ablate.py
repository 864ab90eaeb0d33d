"""Ablation runner: every variant of a base recipe x several seeds through train.py, then one table.

Each run is a subprocess `python train.py --config <out>/base.yaml <variant flags> --seed S --output_dir
<out>/<variant>/seed<S>`; finished runs (summary.json present) are skipped and interrupted ones resumed from
last.pt, so an ablation can be stopped and rerun at any time. The table gives mean ± sample std (ddof=1) over
seeds and the paired difference to the first variant: mean of per-seed differences ± t_{0.975,n-1} sd / sqrt(n).
    python ablate.py configs/ablation_fmnist.yaml [--seeds 3] [--cumulative] [--jobs 1] [--out runs/ablation]
                     [--only NAME ...] [--dry_run] [--report]
Spec (YAML): `base: {flag: value}` and/or `base_config: FILE` (a train.py --config file, relative to the current
directory; `base` overrides it), `variants: [{name: baseline, flags: {}}, {name: "+ crop+flip", flags:
{crop_padding: 2, hflip: 0.5}}, ...]`, optional `seeds: 3` (or a list), `cumulative: false` (true: variant k
adds its flags to those of variants 1..k-1, a recipe), `metric: test_acc` (the summary.json key compared; a
variant may name its own, e.g. `metric: test_acc_ema` for EMA, `swa_val_acc` for SWA; cumulative steps inherit it).
A base with `fold: all` and `kfold: K` cross-validates every run (crossval.py: <run dir>/fold0..K-1, resumed by
rerunning) and compares its out-of-fold accuracy, `oof_acc` in cv_summary.json, unless the spec names a metric.
--jobs J runs J trainings at once with cores // J threads each (OMP_NUM_THREADS and train.py --threads), so
jobs x threads <= cores. Small models often use 1 thread about as well as 2, so --jobs 2 can finish sooner on
2 cores; train times in the table are comparable only between ablations run with the same --jobs.
Outputs (in --out): ablation.md, ablation.json and ablation.png, and ablation.csv with one row per finished run;
the CSV opens with the environment of the call that first wrote it (`# key: value` lines, reporting/environment.py)
and each row's `env` column names the machine its run was launched on, so a resumed ablation shows mixed machines.
"""
import argparse
import difflib
import json
import logging
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

import yaml

import config
from reporting.environment import env_key, environment, read_csv, write_csv, write_json
from utils.errors import Interrupted, UserError, run_cli
from utils.flags import BoolFlag

log = logging.getLogger("ablate")

ROOT = os.path.dirname(os.path.abspath(__file__))
SPEC_KEYS = {"base", "base_config", "variants", "seeds", "cumulative", "metric"}
VARIANT_KEYS = {"name", "flags", "metric"}
# Set by ablate.py for every run, so a spec may not set them.
RESERVED = {"seed", "output_dir", "resume", "overwrite", "config", "eval_only", "ckpt", "plot_lr", "preview_aug",
            "threads"}
# Flags that change how a run executes but not what it computes; a finished run is reused whatever they were.
NOT_COMPARED = {"threads", "jobs", "progress", "tensorboard", "workers"}
NAMED_CHOICES = {"opt": config.OPTIMIZERS, "scheduler": config.SCHEDULERS, "init": config.INITS}


# ---------------------------------------------------------------- the spec

def load_spec(path):
    """Read and check the spec's structure; returns a dict with base (flags), variants, seeds, cumulative, metric."""
    if not os.path.isfile(path):
        raise UserError(f"ablation spec {path} does not exist; pass a YAML file such as configs/ablation_fmnist.yaml")
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ablation spec {path} is not valid YAML ({first}); fix its syntax")
    if not isinstance(spec, dict):
        raise UserError(f"ablation spec {path} must be a mapping with keys base/base_config and variants")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise UserError(f"ablation spec {path} has unknown key(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(sorted(SPEC_KEYS))}")
    parser = config.get_parser()
    base = {}
    if spec.get("base_config") is not None:
        base.update(config.load_config_file(str(spec["base_config"]), parser))
    inline = spec.get("base") or {}
    if not isinstance(inline, dict):
        raise UserError(f"ablation spec {path}: base must be a mapping of flag names to values")
    base.update(inline)
    _check_flags(base, "base", parser)

    variants = spec.get("variants")
    if not isinstance(variants, list) or not variants:
        raise UserError(f"ablation spec {path} needs a non-empty list `variants:`; the first is the baseline")
    cross_validated = {str(k).replace("-", "_"): x for k, x in base.items()}.get("fold") == "all"
    metric = spec.get("metric", "oof_acc" if cross_validated else "test_acc")  # fold: all -> cv_summary.json
    out, slugs = [], {}
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or "name" not in v:
            raise UserError(f"ablation spec {path}: variant {i + 1} must be a mapping with a name (and flags)")
        bad = sorted(set(v) - VARIANT_KEYS)
        if bad:
            raise UserError(f"ablation spec {path}: variant {v['name']!r} has unknown key(s) {', '.join(bad)}; "
                            f"allowed: name, flags, metric")
        flags = v.get("flags") or {}
        if not isinstance(flags, dict):
            raise UserError(f"ablation spec {path}: flags of variant {v['name']!r} must be a mapping")
        _check_flags(flags, f"variant {v['name']!r}", parser)
        name = str(v["name"])
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or f"variant{i}"
        if slug in slugs:
            raise UserError(f"ablation spec {path}: variants {slugs[slug]!r} and {name!r} share the directory name "
                            f"{slug!r}; rename one")
        slugs[slug] = name
        out.append({"name": name, "slug": slug, "own_flags": {k.replace("-", "_"): x for k, x in flags.items()},
                    "own_metric": None if v.get("metric") is None else str(v["metric"])})
    return {"base": {k.replace("-", "_"): x for k, x in base.items()}, "variants": out,
            "seeds": spec.get("seeds", 3), "cumulative": bool(spec.get("cumulative", False)), "metric": metric}


def _check_flags(flags, where, parser):
    known = {a.dest for a in parser._actions} - {"help"}
    for k in flags:
        key = str(k).replace("-", "_")
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise UserError(f"{where} sets unknown flag {k!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                            f"flags are train.py's, without dashes (python train.py --help)")
        if key in RESERVED:
            raise UserError(f"{where} sets {key!r}, which ablate.py sets for every run; remove it from the spec")


def seed_list(seeds):
    if isinstance(seeds, bool) or not (isinstance(seeds, int) or
                                       (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds))):
        raise UserError(f"seeds must be a count or a list of integers (got {seeds!r})")
    seeds = list(range(seeds)) if isinstance(seeds, int) else seeds
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be at least one distinct seed (got {seeds!r})")
    return seeds


# ---------------------------------------------------------------- from flags to commands

def cli_tokens(parser, flags):
    """train.py command-line tokens for `flags` (booleans as --x / --no_x), plus the flags a command line cannot
    say (a value of null), which go into a config file instead."""
    actions = {a.dest: a for a in parser._actions}
    tokens, rest = [], {}
    for k, v in flags.items():
        a, opt = actions[k], f"--{k}"
        if isinstance(a, config.BoolFlag) and isinstance(v, bool):  # `auto` (--amp) goes as a value
            tokens.append(opt if v else f"--no_{k}")
        elif v is None:
            rest[k] = v
        elif isinstance(v, (list, tuple)):
            tokens += [opt, *map(str, v)]
        else:
            tokens += [opt, str(v)]
    return tokens, rest


def resolve(base, rest, tokens, where):
    """The argparse Namespace train.py will see (defaults < config file < command line); bad values -> UserError."""
    parser = config.get_parser()

    def error(message):
        raise UserError(f"{where}: {message}")
    parser.error = error  # argparse would print the usage and exit; say which variant is wrong instead
    parser.set_defaults(**{**base, **rest})
    ns = parser.parse_args(tokens)
    for flag, names in NAMED_CHOICES.items():
        if getattr(ns, flag) not in names:
            raise UserError(f"{where}: --{flag} {getattr(ns, flag)!r} is not one of {', '.join(names)}")
    return ns


def plan(spec, out, seeds, threads, only=None):
    """One entry per (variant, seed): its directory, command and status (done | resume | restart | new)."""
    variants, acc, metric = [], {}, spec["metric"]
    for i, v in enumerate(spec["variants"]):
        # cumulative: flags and metric carry over to the later steps of the recipe (EMA on -> scored as EMA)
        acc = {**acc, **v["own_flags"]} if spec["cumulative"] else dict(v["own_flags"])
        metric = v["own_metric"] or (metric if spec["cumulative"] else spec["metric"])
        if only is not None and i > 0 and v["name"] not in only and v["slug"] not in only:
            continue
        variants.append({**v, "flags": dict(acc), "metric": metric})
    base_path = os.path.join(out, "base.yaml")
    runs = []
    for v in variants:
        tokens, rest = cli_tokens(config.get_parser(), v["flags"])
        v["config"] = os.path.join(out, v["slug"], "base.yaml") if rest else base_path
        v["config_flags"] = {**spec["base"], **rest}
        for seed in seeds:
            run_dir = os.path.join(out, v["slug"], f"seed{seed}")
            argv = [*tokens, "--seed", str(seed), "--output_dir", run_dir, "--threads", str(threads)]
            expected = vars(config.resolve_infobatch(resolve(spec["base"], rest, argv, f"variant {v['name']!r}")))
            cv = expected["fold"] == "all"  # crossval.py resumes its folds when the same command reruns
            if cv and expected["kfold"] < 2:
                raise UserError(f"variant {v['name']!r}: fold: all cross-validates and needs kfold: K with K >= 2")
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", v["config"], *argv]
            runs.append({"variant": v["name"], "seed": seed, "dir": run_dir, "cmd": cmd,
                         "status": _status(run_dir, expected, v["name"])})
            if runs[-1]["status"] == "resume" and not cv:
                cmd += ["--resume", os.path.join(run_dir, "last.pt")]
            elif runs[-1]["status"] == "restart":
                cmd.append("--overwrite")
    return variants, runs


def _status(run_dir, expected, name):
    """done: summary.json present; resume: last.pt but no summary; restart: other checkpoints only; new.
    A run directory trained with other flags than the spec now gives is refused (stale results). A cross-validation
    (fold: all) is done with its cv_summary.json and resumes (its fold checkpoints) by running again."""
    saved_path = os.path.join(run_dir, "config.yaml")
    cv = expected.get("fold") == "all"
    summary = os.path.join(run_dir, "cv_summary.json" if cv else "summary.json")
    has_ckpt = any(f.endswith(".pt") for _, _, files in os.walk(run_dir) for f in files)  # fold: all: in fold*/
    if os.path.isfile(saved_path):
        with open(saved_path) as f:
            saved = yaml.safe_load(f) or {}
        defaults = vars(config.get_parser().parse_args([]))
        diff = [k for k, want in expected.items() if k not in NOT_COMPARED | config._RUN_LOCAL | {"output_dir"}
                and _norm(saved.get(k, defaults.get(k))) != _norm(want)]
        if diff and (has_ckpt or os.path.isfile(summary)):
            k = diff[0]
            raise UserError(f"{run_dir} was trained with {k}={saved.get(k, defaults.get(k))!r} but variant {name!r} "
                            f"now gives {k}={expected[k]!r} ({len(diff)} flag(s) differ); delete that directory "
                            f"to rerun it, or use another --out")
    if os.path.isfile(summary):
        return "done"
    if os.path.isfile(os.path.join(run_dir, "last.pt")) or (cv and has_ckpt):
        return "resume"
    return "restart" if has_ckpt else "new"


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------- running

def execute(runs, jobs, threads, machine):
    """Run the pending commands, `jobs` at a time; returns {(variant, seed): (returncode, seconds)}.
    Each child's stdout and stderr go to <run dir>/ablate_stdout.log (appended, so a resumed run keeps both);
    <run dir>/ablate_env.json holds the command and the environment `machine` it was (last) launched in."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = [r for r in runs if r["status"] != "done"]
    running, results, n = {}, {}, len(pending)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                r = pending.pop(0)
                os.makedirs(r["dir"], exist_ok=True)
                write_json(os.path.join(r["dir"], "ablate_env.json"), {"command": shlex.join(r["cmd"])}, machine)
                f = open(os.path.join(r["dir"], "ablate_stdout.log"), "a")
                f.write(f"$ {shlex.join(r['cmd'])}\n")
                f.flush()
                # The child inherits the working directory, so relative paths in flags mean what they mean here.
                running[(r["variant"], r["seed"])] = (subprocess.Popen(r["cmd"], env=env, stdout=f,
                                                                       stderr=subprocess.STDOUT), f, time.time())
                log.info(f"[{n - len(pending)}/{n}] {r['status']}: {r['variant']} seed {r['seed']}")
            time.sleep(0.1)
            for key, (p, f, t0) in list(running.items()):
                if p.poll() is not None:
                    f.close()
                    results[key] = (p.returncode, time.time() - t0)
                    del running[key]
                    log.info(f"{'finished' if p.returncode == 0 else f'FAILED (exit {p.returncode})'}: "
                             f"{key[0]} seed {key[1]} in {results[key][1]:.0f} s")
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C or SIGTERM
        for p, f, _ in running.values():  # checkpoints stay; the next call resumes these runs
            p.terminate()
            p.wait()
            f.close()
        raise
    return results


def read_run(run_dir, metric):
    """(metric value, train_seconds) from summary.json (cv_summary.json for fold: all), or (None, reason)."""
    path = os.path.join(run_dir, "cv_summary.json")
    if not os.path.isfile(path):
        path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None, _last_error(run_dir)
    with open(path) as f:
        s = json.load(f)
    if metric not in s:
        return None, f"{os.path.basename(path)} has no {metric!r} (keys: {', '.join(sorted(s))})"
    return float(s[metric]), float(s.get("train_seconds", float("nan")))


def run_env(run_dir):
    """env_key() of the environment the run was launched in; "" for runs from before ablate_env.json."""
    path = os.path.join(run_dir, "ablate_env.json")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return env_key(json.load(f)["environment"])


def write_runs_csv(path, runs, values, seconds, metric_of, machine):
    """ablation.csv: one row per finished run, with its environment in `env`. Rows of runs this call did not
    plan are kept, and so is the environment header of the call that first wrote the file.
    Returns the set of environments the rows name."""
    header, rows = (machine, []) if not os.path.isfile(path) else read_csv(path)
    rows = {(r["variant"], r["seed"]): r for r in rows}
    for r in runs:
        key = (r["variant"], str(r["seed"]))
        rows.pop(key, None)  # planned now: the row below, or none if the run has no result any more
        if r["seed"] in values[r["variant"]]:
            rows[key] = {"variant": r["variant"], "seed": r["seed"], "metric": metric_of[r["variant"]],
                         "value": values[r["variant"]][r["seed"]], "train_seconds": seconds[r["variant"]][r["seed"]],
                         "env": run_env(r["dir"])}
    write_csv(path, list(rows.values()), header)
    return {r["env"] for r in rows.values()} - {""}


def _last_error(run_dir):
    path = os.path.join(run_dir, "ablate_stdout.log")
    if not os.path.isfile(path):
        return "not run"
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "Traceback")) or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


# ---------------------------------------------------------------- statistics

def paired_delta(values, ref):
    """Mean over common seeds of values[s] - ref[s], its 95% half-width t_{0.975, n-1} * sd / sqrt(n)
    (sd with ddof=1; None for n < 2), and n."""
    from scipy.stats import t
    d = [values[s] - ref[s] for s in values if s in ref]
    if not d:
        return None, None, 0
    if len(d) < 2:
        return statistics.fmean(d), None, len(d)
    return statistics.fmean(d), float(t.ppf(0.975, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d)), len(d)


def summarize(variants, values, seconds, seeds, cumulative):
    """Rows of the table. values/seconds: {variant name: {seed: float}} of the finished runs."""
    rows, base = [], values[variants[0]["name"]]
    for i, v in enumerate(variants):
        vals = values[v["name"]]
        row = {"name": v["name"], "dir": v["slug"], "metric": v["metric"], "flags": v["flags"],
               "n": len(vals), "seeds": len(seeds), "values": {str(s): x for s, x in vals.items()},
               "mean": statistics.fmean(vals.values()) if vals else None,
               "std": statistics.stdev(vals.values()) if len(vals) > 1 else None,
               "train_seconds": statistics.fmean(seconds[v["name"]].values()) if seconds[v["name"]] else None}
        # a difference only between variants whose every seed finished: a partial mean is not comparable
        row["complete"] = len(vals) == len(seeds) and len(base) == len(seeds)
        if i > 0:
            row["delta"], row["ci95"], row["n_paired"] = (paired_delta(vals, base) if row["complete"]
                                                          else (None, None, 0))
            if cumulative:
                prev = values[variants[i - 1]["name"]]
                row["delta_prev"], row["ci95_prev"], row["n_paired_prev"] = (
                    paired_delta(vals, prev) if row["complete"] and len(prev) == len(seeds) else (None, None, 0))
        rows.append(row)
    return rows


def markdown(rows, cumulative):
    """The table in percent (accuracy) and percentage points (differences)."""
    pct = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731

    def delta(m, h, r):
        if not r["complete"]:
            return f"— (seeds {r['n']}/{r['seeds']}; baseline {rows[0]['n']}/{r['seeds']})"
        return "—" if m is None else f"{100 * m:+.2f}" + ("" if h is None else f" ± {100 * h:.2f}")
    show_metric = len({r["metric"] for r in rows}) > 1
    head = ["variant", "seeds", "accuracy (%) mean ± std", "Δ vs baseline (pts) ± 95% CI"]
    head += ["Δ vs previous (pts) ± 95% CI"] if cumulative else []
    head += ["train time (s)"] + (["metric"] if show_metric else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, r in enumerate(rows):
        acc = "—" if r["mean"] is None else pct(r["mean"]) + ("" if r["std"] is None else f" ± {100 * r['std']:.2f}")
        cells = [r["name"].replace("|", "\\|"), f"{r['n']}/{r['seeds']}", acc,
                 "(reference)" if i == 0 else delta(r["delta"], r["ci95"], r)]
        if cumulative:
            cells.append("—" if i == 0 else delta(r["delta_prev"], r["ci95_prev"], r))
        t = r["train_seconds"]
        cells.append("—" if t is None else f"{t:.1f}" if t < 100 else f"{t:.0f}")
        cells += [r["metric"]] if show_metric else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """ablation.png: accuracy mean ± std per variant, and the paired Δ with its 95% CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["name"] for r in rows][::-1]
    ys = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.32 * len(rows)), sharey=True)
    mean = [100 * (r["mean"] or 0) for r in rows][::-1]
    a.barh(ys, mean, xerr=[100 * (r["std"] or 0) for r in rows][::-1], color="tab:blue", capsize=3)
    done = [m for m, r in zip(mean, rows[::-1]) if r["mean"] is not None]
    if done:
        a.set_xlim(min(done) - 2, max(done) + 1)
    a.set_yticks(list(ys), names)
    a.set_xlabel("accuracy (%), mean ± std over seeds")
    d = [100 * (r.get("delta") or 0) for r in rows][::-1]
    b.barh(ys, d, xerr=[100 * (r.get("ci95") or 0) for r in rows][::-1],
           color=["tab:green" if x > 0 else "tab:red" if x < 0 else "tab:gray" for x in d], capsize=3)
    b.axvline(0, color="black", lw=0.8)
    b.set_xlabel("Δ vs baseline (points), paired 95% CI")
    for ax in (a, b):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- main

def get_parser():
    p = argparse.ArgumentParser(description="Run an ablation: every variant x seeds through train.py, one table.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("spec", help="ablation spec (YAML): base/base_config, variants, seeds, cumulative, metric")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1; None: the spec's seeds, else 3")
    p.add_argument("--cumulative", action=BoolFlag, default=None,
                   help="stack the variants' flags in order, like a recipe; None: the spec's setting, else off")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once; each gets cores // jobs threads")
    p.add_argument("--threads", type=int, default=0, help="threads per training (0 = cores // jobs)")
    p.add_argument("--out", default="runs/ablation", help="root directory: <out>/<variant>/seed<S>")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these variants (name or directory name); the baseline always runs")
    p.add_argument("--dry_run", action=BoolFlag, help="print the plan and commands, run and write nothing")
    p.add_argument("--report", action=BoolFlag,
                   help="train nothing: write the table from the runs finished so far (the others show their "
                        "finished seed counts and no difference)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = load_spec(args.spec)
    if args.cumulative is not None:
        spec["cumulative"] = args.cumulative
    seeds = seed_list(args.seeds if args.seeds is not None else spec["seeds"])
    if args.jobs < 1 or args.threads < 0:
        raise UserError("--jobs must be >= 1 and --threads >= 0")
    names = {v["name"] for v in spec["variants"]} | {v["slug"] for v in spec["variants"]}
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        raise UserError(f"--only: no variant named {', '.join(map(repr, unknown))}; the spec has "
                        f"{', '.join(repr(v['name']) for v in spec['variants'])}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.jobs)
    if args.jobs * threads > cores:
        log.warning(f"--jobs {args.jobs} x {threads} threads exceeds {cores} cores; runs will be slower and "
                    f"their train times not comparable with a run at --jobs 1")
    variants, runs = plan(spec, args.out, seeds, threads, args.only)  # validates every variant before any run

    if args.dry_run:
        for r in runs:
            print(f"# {r['variant']} seed {r['seed']}: {r['status']}")
            if r["status"] != "done":
                print(shlex.join(r["cmd"]))
        return 0
    from utils.logger import setup_logging
    os.makedirs(args.out, exist_ok=True)
    setup_logging(os.path.join(args.out, "ablate.log"))
    with open(os.path.join(args.out, "base.yaml"), "w") as f:
        yaml.safe_dump(spec["base"], f, sort_keys=False)
    for v in variants:
        if v["config"] != os.path.join(args.out, "base.yaml"):
            os.makedirs(os.path.dirname(v["config"]), exist_ok=True)
            with open(v["config"], "w") as f:
                yaml.safe_dump(v["config_flags"], f, sort_keys=False)
    machine = {**environment(), "threads": threads}  # the threads of each training, not of this process
    todo = sum(r["status"] != "done" for r in runs)
    log.info(f"{len(variants)} variants x {len(seeds)} seeds: {len(runs) - todo} done, {todo} to run "
             f"({args.jobs} at a time, {threads} threads each)")
    t0 = time.time()
    try:
        execute([] if args.report else runs, args.jobs, threads, machine)
    except (KeyboardInterrupt, Interrupted) as e:
        raise Interrupted(getattr(e, "signum", signal.SIGINT), "finished runs are kept and the others resume "
                          "from their last complete epoch: rerun the same command") from None

    values = {v["name"]: {} for v in variants}
    seconds = {v["name"]: {} for v in variants}
    failed = []
    metric_of = {v["name"]: v["metric"] for v in variants}
    for r in runs:
        if args.report and r["status"] != "done":
            continue  # not run yet: counted as a missing seed, not as a failure
        value, extra = read_run(r["dir"], metric_of[r["variant"]])
        if value is None:
            failed.append({"variant": r["variant"], "seed": r["seed"], "dir": r["dir"], "error": extra})
        else:
            values[r["variant"]][r["seed"]] = value
            seconds[r["variant"]][r["seed"]] = extra
    rows = summarize(variants, values, seconds, seeds, spec["cumulative"])
    for r in rows:
        log.info(f"{r['name']}: {r['n']}/{r['seeds']} seeds finished" + ("" if r["complete"] else
                                                                           ", no difference reported"))
    table = markdown(rows, spec["cumulative"])
    if failed:
        table += "\nFailed runs (see ablate_stdout.log in the run directory):\n" + "".join(
            f"- {f['variant']} seed {f['seed']}: {f['error']}\n" for f in failed)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(table)
    result = {"spec": os.path.abspath(args.spec), "seeds": seeds, "cumulative": spec["cumulative"],
              "base": spec["base"], "jobs": args.jobs, "threads": threads,
              "wall_seconds_this_call": time.time() - t0, "units": "fractions in [0, 1], as in summary.json",
              "std": "sample standard deviation (ddof=1) over seeds",
              "ci95": "half-width t_{0.975, n-1} * sd(d) / sqrt(n) of the per-seed differences d",
              "variants": rows, "failed": failed}
    write_json(os.path.join(args.out, "ablation.json"), result, machine)
    envs = write_runs_csv(os.path.join(args.out, "ablation.csv"), runs, values, seconds, metric_of, machine)
    if len(envs) > 1:
        log.warning(f"the runs were launched in {len(envs)} environments ({'; '.join(sorted(envs))}); train "
                    f"times compare only within one (see the env column of ablation.csv)")
    plot(rows, os.path.join(args.out, "ablation.png"))
    print(table, end="")
    log.info(f"wrote {args.out}/ablation.md, ablation.json, ablation.csv, ablation.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
