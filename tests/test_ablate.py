"""ablate.py: the table's means, sample stds (ddof=1), paired Δ and 95% t intervals against a hand computation,
on fabricated summary.json files and on real runs; a rerun redoes only the run whose summary is missing; a bad
spec is refused (exit 2) before any run starts; configs/ablation_fmnist.yaml names every trick and validates;
ablation.json and ablation.csv carry the environment, and each CSV row the environment its run was launched in."""
import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, needs_fmnist, run_script
from scipy.stats import t as student_t

import ablate
import config
from reporting.environment import env_key, environment, read_csv, write_csv
from utils.errors import UserError

T_975_DF1, T_975_DF2 = 12.706204736174707, 4.302652729911275  # Student t quantiles from a table


def _write_spec(path, variants, base=None, **extra):
    spec = {"base": base if base is not None else {"epochs": 1}, "variants": variants, **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _hand(vals, ref):
    """mean, sample std, paired Δ and CI half-width, computed with numpy and scipy directly."""
    v = np.array([vals[s] for s in sorted(vals)])
    common = sorted(set(vals) & set(ref))
    d = np.array([vals[s] - ref[s] for s in common])
    half = student_t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else None
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else None), d.mean(), half


def _row(md, name):
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _fmt_acc(mean, std):
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _fmt_delta(mean, half):
    return f"{100 * mean:+.2f} ± {100 * half:.2f}"


def _results(out):
    """ablation.json's results, after checking its environment header."""
    doc = json.loads((out / "ablation.json").read_text())
    assert list(doc) == ["environment", "results"] and doc["environment"]["torch"] == torch.__version__
    return doc["results"]


def _runs_csv(out):
    """ablation.csv's environment header and {(variant, seed): row}."""
    env, rows = read_csv(out / "ablation.csv")
    return env, {(r["variant"], int(r["seed"])): r for r in rows}


# ---------------------------------------------------------------- maths on fabricated summaries

def test_t_quantile_and_paired_delta_closed_form():
    assert student_t.ppf(0.975, 1) == pytest.approx(T_975_DF1, abs=1e-9)
    assert student_t.ppf(0.975, 2) == pytest.approx(T_975_DF2, abs=1e-9)
    # d = (0.03, 0.00, 0.04): mean 0.07/3, sd = sqrt(sum (d - mean)^2 / 2)
    mean, half, n = ablate.paired_delta({0: 0.93, 1: 0.92, 2: 0.95}, {0: 0.90, 1: 0.92, 2: 0.91})
    m = 0.07 / 3
    sd = math.sqrt(((0.03 - m) ** 2 + m ** 2 + (0.04 - m) ** 2) / 2)
    assert n == 3 and mean == pytest.approx(m, abs=1e-12)
    assert half == pytest.approx(T_975_DF2 * sd / math.sqrt(3), abs=1e-10)  # 0.93 - 0.90 is not exactly 0.03
    # pairing uses common seeds only; one pair has no interval; none has no Δ
    assert ablate.paired_delta({0: 0.5, 2: 0.7}, {0: 0.4, 1: 0.9, 2: 0.5})[2] == 2
    assert ablate.paired_delta({1: 0.5}, {1: 0.25, 2: 0.1}) == (0.25, None, 1)
    assert ablate.paired_delta({}, {0: 0.5}) == (None, None, 0)


def test_table_from_fabricated_summaries(tmp_path):
    """Finished runs (summary.json present) are read, not rerun; every number in the JSON and the Markdown
    equals the hand computation, including a variant with a missing seed and one whose summary lacks the metric."""
    out = tmp_path / "abl"
    accs = {"baseline": {0: 0.9012, 1: 0.9120, 2: 0.9071},
            "crop": {0: 0.9134, 1: 0.9155, 2: 0.9190},
            "ema": {0: 0.9040, 2: 0.9101}}  # seed 1 missing -> reported as failed, paired over seeds 0 and 2
    secs = {"baseline": [10.0, 12.0, 11.0], "crop": [13.0, 13.5, 14.0], "ema": [20.0, 0.0, 22.0]}
    for name, vals in accs.items():
        for seed in range(3):
            d = out / name / f"seed{seed}"
            d.mkdir(parents=True)
            s = {"train_seconds": secs[name][seed], "test_acc": 0.5}
            if seed in vals:
                s["test_acc_ema" if name == "ema" else "test_acc"] = vals[seed]
            (d / "summary.json").write_text(json.dumps(s))
    spec = _write_spec(tmp_path / "spec.yaml", [{"name": "baseline"}, {"name": "crop", "flags": {"crop_padding": 2}},
                                                {"name": "ema", "flags": {"ema": True}, "metric": "test_acc_ema"}])
    rc = ablate.main([spec, "--out", str(out)])
    assert rc == 1  # the missing EMA seed counts as a failed run
    res = _results(out)
    md = (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 1000
    rows = {r["name"]: r for r in res["variants"]}
    assert [f["seed"] for f in res["failed"]] == [1] and "test_acc_ema" in res["failed"][0]["error"]
    for name in ("crop", "ema"):
        mean, std, dm, half = _hand(accs[name], accs["baseline"])
        r = rows[name]
        assert r["mean"] == pytest.approx(mean, abs=1e-12) and r["std"] == pytest.approx(std, abs=1e-12)
        assert r["n"] == len(accs[name])
        cells = _row(md, name)
        assert cells[1] == f"{len(accs[name])}/3" and cells[2] == _fmt_acc(mean, std)
    mean, std, dm, half = _hand(accs["crop"], accs["baseline"])
    assert rows["crop"]["delta"] == pytest.approx(dm, abs=1e-12) and rows["crop"]["n_paired"] == 3
    assert rows["crop"]["ci95"] == pytest.approx(half, abs=1e-12) and _row(md, "crop")[3] == _fmt_delta(dm, half)
    # a variant with a seed missing gets no difference: a partial mean is not comparable to the baseline's
    assert not rows["ema"]["complete"] and rows["ema"]["delta"] is None and rows["ema"]["ci95"] is None
    assert _row(md, "ema")[3] == "— (seeds 2/3; baseline 3/3)"
    assert rows["baseline"]["train_seconds"] == pytest.approx(11.0)
    assert _row(md, "crop")[4] == "13.5" and _row(md, "ema")[4] == "21.0"  # mean over the finished seeds
    assert _row(md, "ema")[5] == "test_acc_ema" and _row(md, "baseline")[3] == "(reference)"
    # ablation.csv: one row per finished run; none was launched by ablate.py, so none names an environment
    env, runs = _runs_csv(out)
    assert env["torch"] == torch.__version__ and env["threads"] == len(os.sched_getaffinity(0))  # cores // jobs
    assert {k: float(r["value"]) for k, r in runs.items()} == {(n, s): x for n, v in accs.items() for s, x in v.items()}
    assert runs["ema", 0]["metric"] == "test_acc_ema" and float(runs["crop", 1]["train_seconds"]) == 13.5
    assert {r["env"] for r in runs.values()} == {""}

    # cumulative: a second column pairs each row with the one before it
    write_csv(out / "ablation.csv", list(runs.values()), {**env, "cpu_model": "First CPU"})  # the first writer
    spec_c = _write_spec(tmp_path / "spec_c.yaml", [{"name": "baseline"}, {"name": "crop"}], cumulative=True)
    rc = ablate.main([spec_c, "--out", str(out)])
    res = _results(out)
    # the CSV keeps its first writer's header and the rows of the variants this call did not plan (ema)
    assert _runs_csv(out) == ({**env, "cpu_model": "First CPU"}, runs)
    _, _, dm, half = _hand(accs["crop"], accs["baseline"])
    assert rc == 0 and res["variants"][1]["delta_prev"] == pytest.approx(dm, abs=1e-12)
    assert _row((out / "ablation.md").read_text(), "crop")[4] == _fmt_delta(dm, half)


def test_report_trains_nothing_and_counts_finished_seeds(tmp_path, monkeypatch):
    """--report writes the table from the finished runs only: an unstarted seed is a missing seed (no failure,
    no difference for its variant), and no training is launched."""
    out = tmp_path / "abl"
    accs = {"baseline": {0: 0.90, 1: 0.91}, "crop": {0: 0.92, 1: 0.93}, "ema": {0: 0.95}}
    for name, vals in accs.items():
        for seed, acc in vals.items():
            d = out / name / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"train_seconds": 1.0, "test_acc": acc}))
    spec = _write_spec(tmp_path / "spec.yaml", [{"name": "baseline"}, {"name": "crop", "flags": {"crop_padding": 2}},
                                                {"name": "ema", "flags": {"ema": True}}], seeds=2)
    real_execute = ablate.execute
    monkeypatch.setattr(ablate, "execute", lambda runs, *a: runs and pytest.fail("--report launched a training")
                        or real_execute(runs, *a))
    assert ablate.main([spec, "--out", str(out), "--report"]) == 0
    rows = {r["name"]: r for r in _results(out)["variants"]}
    assert rows["crop"]["delta"] == pytest.approx(0.02, abs=1e-12) and rows["crop"]["complete"]
    assert rows["ema"]["n"] == 1 and rows["ema"]["delta"] is None and _results(out)["failed"] == []
    assert _row((out / "ablation.md").read_text(), "ema")[3] == "— (seeds 1/2; baseline 2/2)"
    # the docs table made from ablation.json: the same numbers in percent, no difference for the partial variant
    from reporting import ablation_export
    table = tmp_path / "docs.csv"
    assert ablation_export.main([str(out / "ablation.json"), str(table), "--command", "python ablate.py S"]) == 0
    docs = {r["variant"]: r for r in csv.DictReader(open(table))}
    assert docs["crop"]["acc_mean"] == "92.50" and docs["crop"]["delta_pts"] == "+2.00"
    assert docs["ema"]["seeds"] == "1/2" and docs["ema"]["delta_pts"] == "" and docs["ema"]["ci95_pts"] == ""
    assert docs["baseline"]["command"] == "python ablate.py S" and docs["crop"]["anchor"] == "crop"
    assert docs["crop"]["per_seed"] == "s0 92.00 / s1 93.00" and docs["ema"]["per_seed"] == "s0 95.00"


# ---------------------------------------------------------------- spec handling

def test_flags_become_train_py_tokens_and_resolve_like_train_py(tmp_path):
    parser = config.get_parser()
    flags = {"ema": True, "acb": False, "amp": False, "cutout": [1, 8], "lr": "1e-3", "color_jitter": None}
    tokens, rest = ablate.cli_tokens(parser, flags)
    assert tokens == ["--ema", "--no_acb", "--no_amp", "--cutout", "1", "8", "--lr", "1e-3"]
    assert rest == {"color_jitter": None}  # a command line cannot say null
    base = {"acb": True, "color_jitter": [0.1, 0.1, 0, 0], "epochs": 2}
    ns = ablate.resolve(base, rest, [*tokens, "--seed", "3"], "test")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**base, **rest}))
    want = config.parse_args(["--config", str(cfg), *tokens, "--seed", "3"])
    assert vars(ns) == {**vars(want), "config": None}
    assert ns.acb is False and ns.color_jitter is None and ns.lr == 1e-3 and ns.cutout == [1, 8]


def test_cumulative_stacks_flags_and_metric_in_order(tmp_path):
    spec = ablate.load_spec(_write_spec(tmp_path / "s.yaml", [
        {"name": "baseline"}, {"name": "+ crop", "flags": {"crop_padding": 2}},
        {"name": "+ ema", "flags": {"ema": True}, "metric": "test_acc_ema"},
        {"name": "+ ls", "flags": {"label_smoothing": 0.1}}]))
    spec["cumulative"] = True
    variants, runs = ablate.plan(spec, str(tmp_path / "o"), [0, 1], 1, only=["+ ls"])
    assert [v["name"] for v in variants] == ["baseline", "+ ls"]  # --only keeps the baseline
    assert variants[1]["flags"] == {"crop_padding": 2, "ema": True, "label_smoothing": 0.1}
    assert [v["metric"] for v in variants] == ["test_acc", "test_acc_ema"]  # EMA stays on, so it is scored
    assert len(runs) == 4 and all(r["status"] == "new" for r in runs)
    cmd = runs[2]["cmd"]
    assert cmd[cmd.index("--crop_padding") + 1] == "2" and cmd[cmd.index("--seed") + 1] == "0" and "--ema" in cmd
    assert runs[3]["dir"] == str(tmp_path / "o" / "ls" / "seed1")
    spec["cumulative"] = False
    variants, _ = ablate.plan(spec, str(tmp_path / "o"), [0], 1)
    assert variants[3]["flags"] == {"label_smoothing": 0.1} and variants[3]["metric"] == "test_acc"


def test_status_of_existing_run_dirs(tmp_path):
    """summary.json -> skipped; last.pt -> --resume it; other checkpoints only -> --overwrite; else a new run."""
    spec = ablate.load_spec(_write_spec(tmp_path / "s.yaml", [{"name": "baseline"}]))
    out = tmp_path / "o"
    for seed, files in enumerate([["summary.json", "last.pt"], ["last.pt", "best.pt"], ["best.pt"], ["train.log"]]):
        d = out / "baseline" / f"seed{seed}"
        d.mkdir(parents=True)
        for name in files:
            (d / name).write_text("{}")
    _, runs = ablate.plan(spec, str(out), [0, 1, 2, 3, 4], 1)
    assert [r["status"] for r in runs] == ["done", "resume", "restart", "new", "new"]
    assert runs[1]["cmd"][-2:] == ["--resume", str(out / "baseline" / "seed1" / "last.pt")]
    assert runs[2]["cmd"][-1] == "--overwrite" and "--overwrite" not in runs[3]["cmd"] + runs[4]["cmd"]


@pytest.mark.parametrize("variants, fragment", [
    ([{"name": "baseline"}, {"name": "typo", "flags": {"warmup_epoch": 0}}], "did you mean 'warmup_epochs'"),
    ([{"name": "baseline"}, {"name": "s", "flags": {"seed": 3}}], "ablate.py sets for every run"),
    ([{"name": "baseline"}, {"name": "a", "flags": {"attention": "foo"}}], "invalid choice"),
    ([{"name": "baseline"}, {"name": "o", "flags": {"opt": "adamm"}}], "--opt 'adamm' is not one of"),
    ([{"name": "baseline"}, {"name": "e", "flags": {"epochs": "two"}}], "invalid int value"),
    ([{"name": "a b"}, {"name": "a+b"}], "share the directory name"),
    ([], "non-empty list"),
])
def test_bad_spec_is_refused_before_anything_runs(tmp_path, variants, fragment):
    spec = _write_spec(tmp_path / "s.yaml", variants)
    with pytest.raises(UserError, match=re.escape(fragment)):
        ablate.main([spec, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_spec_exits_2_with_one_line(tmp_path):
    spec = _write_spec(tmp_path / "s.yaml", [{"name": "baseline"}, {"name": "x", "flags": {"warmup_epoch": 0}}])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("variants: [ {name: a\n")
    for args, fragment in (([spec], "unknown flag 'warmup_epoch'"), ([str(bad_yaml)], "not valid YAML"),
                           ([str(tmp_path / "missing.yaml")], "does not exist")):
        r = run_script(["ablate.py", *args, "--out", str(tmp_path / "out")])
        assert r.returncode == 2, r.stderr[-1500:]
        err = r.stderr.strip().splitlines()
        assert err[-1].startswith("error:") and fragment in err[-1] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_fmnist_spec_covers_every_trick_and_validates(tmp_path):
    spec = ablate.load_spec(os.path.join(ROOT, "configs", "ablation_fmnist.yaml"))
    variants, runs = ablate.plan(spec, str(tmp_path / "o"), ablate.seed_list(spec["seeds"]), 2)  # resolves every run
    assert len(runs) == 3 * len(variants) and variants[0]["flags"] == {} and not spec["cumulative"]
    flags = [v["flags"] for v in variants]
    want = [{"warmup_epochs": 0}, {"label_smoothing": 0.1}, {"bias_decay": False}, {"zero_init_residual": True},
            {"init": "lsuv"}, {"init": "kaiming_normal", "init_mode": "fan_out"}, {"scheduler": "onecycle"},
            {"ema": True}, {"swa": True}, {"crop_padding": 2, "hflip": 0.5}, {"random_erasing": 0.25},
            {"init": "xavier_uniform"}, {"init": "orthogonal"}, {"scheduler": "multistep"}, {"rotate": 10},
            {"affine": [0.1, 0.1, 5]}, {"perspective": 0.3}, {"blur": 0.2}, {"color_jitter": [0.3, 0.3, 0, 0]},
            {"auto_augment": "trivialaugment"}, {"aug_backend": "imgaug", "imgaug_preset": "seed"},
            {"cutout": [1, 8]}, {"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}, {"mosaic": 0.5},
            {"attention": "se"}, {"attention": "cbam"}, {"attention": "eca"}, {"attention": "ca"},
            {"drop_path_rate": 0.1}, {"acb": True}, {"tta": True}, {"adv": "fgsm", "adv_eps": 0.03},
            {"opt": "adam"}, {"opt": "adamw"}, {"clip_grad": 2.0}, {"amp": True, "amp_dtype": "bf16"}]
    for w in want:
        assert any(all(f.get(k) == x for k, x in w.items()) for f in flags), w
    onecycle = next(f for f in flags if f.get("scheduler") == "onecycle")
    assert onecycle["warmup_epochs"] == 0
    metric = {v["name"]: v["metric"] for v in variants}
    assert metric["EMA 0.99"] == "test_acc_ema" and metric["SWA (last epoch)"] == "swa_val_acc"


# ---------------------------------------------------------------- real runs

TINY = {"train_subset": 128, "eval_subset": 64, "epochs": 1, "model": "mlp_student", "batch_size": 64,
        "amp": False, "warmup_epochs": 0, "device": "cpu", "progress": False,
        "label_smoothing": 0.0, "hflip": 0.0, "infobatch": 0.0, "tta": False, "eval_interval": 1}


@needs_fmnist
def test_real_runs_table_rerun_and_failure(tmp_path):
    out = tmp_path / "abl"
    variants = [{"name": "baseline"}, {"name": "+ lr 0.05", "flags": {"lr": 0.05, "hflip": 0.5}}]
    spec = _write_spec(tmp_path / "s.yaml", variants, base=TINY)
    r = run_script(["ablate.py", spec, "--seeds", "2", "--jobs", "2", "--out", str(out)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    summaries = {(v, s): json.loads((out / v / f"seed{s}" / "summary.json").read_text())
                 for v in ("baseline", "lr_0_05") for s in (0, 1)}
    cfg = yaml.safe_load((out / "lr_0_05" / "seed1" / "config.yaml").read_text())
    assert cfg["seed"] == 1 and cfg["lr"] == 0.05 and cfg["hflip"] == 0.5 and cfg["model"] == "mlp_student"
    assert cfg["threads"] == 1  # 2 jobs on 2 cores
    base = {s: summaries["baseline", s]["test_acc"] for s in (0, 1)}
    var = {s: summaries["lr_0_05", s]["test_acc"] for s in (0, 1)}
    res = _results(out)
    md = (out / "ablation.md").read_text()
    assert md in r.stdout  # the table is printed too
    b_mean, b_std, _, _ = _hand(base, base)
    mean, std, dm, half = _hand(var, base)
    assert half == pytest.approx(T_975_DF1 * abs((var[0] - base[0]) - (var[1] - base[1])) / 2, abs=1e-12)
    rows = res["variants"]
    assert rows[0]["mean"] == pytest.approx(b_mean, abs=1e-12) and rows[0]["std"] == pytest.approx(b_std, abs=1e-12)
    assert rows[1]["mean"] == pytest.approx(mean, abs=1e-12) and rows[1]["std"] == pytest.approx(std, abs=1e-12)
    assert rows[1]["delta"] == pytest.approx(dm, abs=1e-12) and rows[1]["ci95"] == pytest.approx(half, abs=1e-12)
    assert _row(md, "baseline")[2] == _fmt_acc(b_mean, b_std)
    assert _row(md, "+ lr 0.05")[2:4] == [_fmt_acc(mean, std), _fmt_delta(dm, half)]
    secs = np.mean([summaries["lr_0_05", s]["train_seconds"] for s in (0, 1)])
    assert rows[1]["train_seconds"] == pytest.approx(secs, abs=1e-9)
    # ablation.csv: every run, launched here, in this environment; the header gives each training's threads
    env, runs = _runs_csv(out)
    here = env_key(environment())
    assert env["torch"] == torch.__version__ and env["threads"] == 1
    assert {k: float(r["value"]) for k, r in runs.items()} == {(n, s): summaries[slug, s]["test_acc"] for n, slug in
                                                               (("baseline", "baseline"), ("+ lr 0.05", "lr_0_05"))
                                                               for s in (0, 1)}
    assert {r["env"] for r in runs.values()} == {here}
    launched = json.loads((out / "lr_0_05" / "seed1" / "ablate_env.json").read_text())
    assert env_key(launched["environment"]) == here and "--seed 1" in launched["results"]["command"]

    # interrupted ablation: one summary gone (its checkpoint stays) -> only that run is redone, by --resume;
    # a finished run launched on another machine keeps its environment in the CSV, and the mix is reported
    gone = out / "lr_0_05" / "seed1" / "summary.json"
    gone.unlink()
    elsewhere = out / "baseline" / "seed0" / "ablate_env.json"
    doc = json.loads(elsewhere.read_text())
    elsewhere.write_text(json.dumps({**doc, "environment": {**doc["environment"], "cpu_model": "Other CPU"}}))
    others = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    assert len(others) == 3
    assert ablate.main([spec, "--seeds", "2", "--out", str(out)]) == 0  # in-process: saves an interpreter start
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert json.loads(gone.read_text())["test_acc"] == var[1]  # same weights, same evaluation
    log = (out / "ablate.log").read_text()  # both calls, appended
    assert "0 done, 4 to run" in log and "3 done, 1 to run" in log and log.count("resume: + lr 0.05 seed 1") == 1
    assert _results(out)["variants"] == rows
    assert "--resume" in (out / "lr_0_05" / "seed1" / "ablate_stdout.log").read_text()
    env2, runs2 = _runs_csv(out)
    assert env2 == env and set(runs2) == set(runs)  # the first writer's header
    assert runs2["baseline", 0]["env"] == env_key({**environment(), "cpu_model": "Other CPU"})
    assert {r["env"] for k, r in runs2.items() if k != ("baseline", 0)} == {here}
    assert float(runs2["+ lr 0.05", 1]["value"]) == var[1] and "launched in 2 environments" in log

    # a finished run trained with other flags than the spec now gives is refused, nothing runs
    changed = _write_spec(tmp_path / "c.yaml", [{"name": "baseline"}, {"name": "+ lr 0.05", "flags": {"lr": 0.1}}],
                          base=TINY)
    with pytest.raises(UserError, match="was trained with lr=0.05"):
        ablate.main([changed, "--seeds", "2", "--out", str(out)])

    # a failing variant is reported in the table (0/1 seeds) and the exit code, not a crash; --only skips
    # the other finished variant and the baseline is read, not rerun
    broken = _write_spec(tmp_path / "b.yaml", [*variants, {"name": "broken", "flags": {"swa": True, "swa_start": 5}}],
                         base=TINY)
    assert ablate.main([broken, "--seeds", "1", "--out", str(out), "--only", "broken"]) == 1
    md = (out / "ablation.md").read_text()
    assert _row(md, "broken")[1:3] == ["0/1", "—"] and _row(md, "baseline")[1:3] == ["1/1", f"{100 * base[0]:.2f}"]
    assert [r["name"] for r in _results(out)["variants"]] == ["baseline", "broken"]
    assert _runs_csv(out) == (env2, runs2)  # failed runs add no row; rows of unplanned runs stay
    assert "broken seed 0: error: --swa_start 5 must be below --epochs 1" in md
    assert {p: p.stat().st_mtime_ns for p in others} == others


@needs_fmnist
def test_sigterm_stops_the_runs_with_it_and_says_how_to_resume(tmp_path):
    """SIGTERM to ablate.py (a scheduler's stop) ends its training runs too, keeping their last complete epoch:
    one line, exit 143, and no run left training on its own."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "abl"
    spec = _write_spec(tmp_path / "s.yaml", [{"name": "baseline"}], base={**TINY, "epochs": 2000})
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ablate.py"), spec, "--seeds", "1", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    last = out / "baseline" / "seed0" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["stopped by SIGTERM: finished runs are kept and the others resume from "
                                        "their last complete epoch: rerun the same command"]
    time.sleep(1.0)
    kept = last.stat().st_mtime_ns
    time.sleep(2.0)  # a run still training would have written several epochs by now
    assert last.stat().st_mtime_ns == kept and torch.load(last, weights_only=True)["epoch"] >= 1


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")))
def test_every_shipped_config_validates(name, tmp_path):
    """Ablation specs resolve every run; train configs parse and pass train.py's flag checks."""
    import train
    path = os.path.join(ROOT, "configs", name)
    if name.startswith("ablation_"):
        spec = ablate.load_spec(path)
        variants, runs = ablate.plan(spec, str(tmp_path / "o"), ablate.seed_list(spec["seeds"]), 1)
        assert len(runs) == len(variants) * len(ablate.seed_list(spec["seeds"]))
    elif name.startswith("tune_"):
        import tune
        assert tune.load_space(path)  # a search space for tune.py
    elif name.startswith("distill_"):
        import train_distill
        train.check_args(config.parse_args(["--config", path, "--teacher_ckpt", "t.pt"],
                                           parser=train_distill.get_parser()), distill=True)
    else:
        train.check_args(config.parse_args(["--config", path]))
