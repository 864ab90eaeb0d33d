"""tune.py: a bad space or command is one line and exit 2 with nothing written; trials get exactly the sampled
flags; a study resumes and is shared by workers without running a trial twice or more than N; pruned and failed
trials are recorded as such; best.yaml trains the best trial's flags. Trials are tiny real train.py runs."""
import os
import re
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import ROOT, needs_fmnist

import config
import tune
from reporting.environment import read_csv
from utils.errors import run_cli

TINY = ["--model", "mlp_student", "--train_subset", "128", "--eval_subset", "64", "--batch_size", "64",
        "--epochs", "2", "--warmup_epochs", "0", "--device", "cpu", "--no_progress", "--threads", "1",
        "--hflip", "0", "--infobatch", "0", "--no_tta", "--no_amp",  # the default recipe's tricks off (LS is searched)
        "--eval_interval", "1"]
SPACE = {"lr": {"low": 0.01, "high": 0.5, "log": True}, "label_smoothing": {"low": 0.0, "high": 0.2},
         "ema": {"choices": [True, False]}, "crop_padding": {"low": 0, "high": 2, "step": 1},
         "scheduler": {"choices": ["cosine", "constant"]}, "random_erasing": {"choices": [0, 0.25]}}


def write_space(path, space):
    path.write_text(yaml.safe_dump(space))
    return str(path)


def load(out, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db")


def tune_error(argv, capsys):
    """Run `python tune.py ARGV` in this interpreter; assert exit 2 with one `error: ...` line and return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(tune.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (exc.value.code, err)
    return err[0]


BAD_SPACES = [
    ({"no_such_flag": {"choices": [1, 2]}}, "no_such_flag: not a train.py flag"),
    ({"lr": {"low": 0.5, "high": 0.1}}, "lr: empty range"),
    ({"lr": {"low": 0.1, "high": 0.1}}, "lr: empty range"),
    ({"lr": {"low": "small", "high": 0.5}}, "lr: 'small' is not a number"),
    ({"crop_padding": {"low": 0, "high": 2.5}}, "crop_padding: 2.5 is not an integer"),
    ({"weight_decay": {"low": 0, "high": 0.1, "log": True}}, "weight_decay: log (true/false) needs low > 0"),
    ({"label_smoothing": {"choices": [0.0, 1.0]}}, "label_smoothing: --label_smoothing 1: must be in [0, 1)"),
    ({"ema": {"choices": [1, 0]}}, "ema: 1 is not true or false"),
    ({"scheduler": {"choices": ["cosine", "cosine_anealing"]}}, "'cosine_anealing' is not one of"),
    ({"attention": {"choices": []}}, "attention: choices must be a non-empty list"),
    ({"scheduler": {"low": 0, "high": 1}}, "scheduler: not a number flag"),
    ({"lr": [0.1, 0.2]}, "lr: give {low, high[, log, step]} or {choices: [...]}"),
    ({"epochs": {"low": 1, "high": 3}}, "epochs: cannot be searched (also fixed on the command line"),
    ({"seed": {"low": 0, "high": 3}}, "seed: cannot be searched (set by tune.py)"),
    ({"cutout": {"choices": [1]}}, "cutout: cannot be searched (a list)"),
]


@pytest.mark.parametrize("space,message", BAD_SPACES, ids=[m.split(":")[0] for _, m in BAD_SPACES])
def test_a_bad_space_is_one_line_and_writes_nothing(tmp_path, capsys, space, message):
    out = tmp_path / "out"
    err = tune_error(["--space", write_space(tmp_path / "s.yaml", space), "--n_trials", "2", "--output_dir",
                      str(out), *TINY], capsys)
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--n_trials", "0"], "--n_trials must be at least 1 (got 0)"),
    (["--n_trials", "-3"], "--n_trials must be at least 1 (got -3)"),
    (["--n_trials", "2", "--storage", "sqlite:////no/such/dir/study.db"], "cannot open --storage"),
    (["--n_trials", "2", "--storage", "nosuchdb://u:secret@host/db"], "cannot open --storage host/db"),
    (["--n_trials", "2", "--resume", "x/last.pt"], "--resume is not for a search"),
    (["--n_trials", "2", "--trial_minutes", "1", "--time_budget", "2"], "--trial_minutes sets every trial's"),
    (["--n_trials", "2", "--lr", "-1"], "--lr -1: must be in (0, inf)"),
    (["--n_trials", "2", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_a_bad_command_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    err = tune_error(["--space", write_space(tmp_path / "s.yaml", {"lr": {"low": 0.01, "high": 0.5}}),
                      "--output_dir", str(out), *argv, "--epochs", "2"], capsys)
    assert message in err and "secret" not in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["s.yaml"]


def test_a_flag_fixed_in_a_config_file_cannot_be_searched(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("lr: 0.1\n")
    err = tune_error(["--space", write_space(tmp_path / "s.yaml", {"lr": {"low": 0.01, "high": 0.5}}),
                      "--n_trials", "2", "--output_dir", str(tmp_path / "out"), "--config", str(base)], capsys)
    assert "lr: cannot be searched (also fixed on the command line or in --config)" in err


def test_the_shipped_space_validates():
    space = tune.load_space(os.path.join(ROOT, "configs", "tune_fmnist.yaml"))
    assert {"lr", "weight_decay", "label_smoothing", "warmup_epochs", "ema", "random_erasing", "crop_padding",
            "mixup_alpha", "init", "drop_path_rate"} <= set(space)
    assert space["ema"]["type"] == "bool" and space["crop_padding"]["type"] == "int"
    assert tune.to_argv({"ema": False, "lr": 0.1, "crop_padding": 2}, space) == [
        "--no_ema", "--lr", "0.1", "--crop_padding", "2"]


@pytest.fixture(scope="module")
def study3(tmp_path_factory):
    """A 3-trial study with the default SQLite storage."""
    tmp = tmp_path_factory.mktemp("tune3")
    out, space = tmp / "out", write_space(tmp / "s.yaml", SPACE)
    summary = tune.main(["--space", space, "--n_trials", "3", "--output_dir", str(out), "--seed", "1", *TINY])
    return out, space, summary, load(out, "s")


@needs_fmnist
def test_three_trial_study_writes_runs_and_report(study3):
    out, _, summary, study = study3
    assert summary["states"] == {"complete": 3}
    assert [t.number for t in study.trials] == [0, 1, 2]
    for t in study.trials:
        run = out / f"trial_{t.number:04d}"
        assert {"config.yaml", "metrics.csv", "summary.json", "last.pt"} <= set(os.listdir(run))
        assert sorted(t.intermediate_values) == [1, 2]  # every evaluated epoch was reported
    env, rows = read_csv(out / "trials.csv")
    assert {"cpu_model", "torch", "date"} <= set(env)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE"), ("2", "COMPLETE")]
    assert float(rows[0]["lr"]) == study.trials[0].params["lr"]
    for name in ("report.md", "accuracy_by_trial.png", "param_importances.png", "best.yaml"):
        assert (out / name).is_file(), name
    assert f"Best: trial {study.best_trial.number}" in (out / "report.md").read_text()


@needs_fmnist
def test_a_trial_gets_exactly_the_sampled_flags(study3):
    out, _, _, study = study3
    fixed = vars(config.parse_args(TINY + ["--seed", "1"]))
    for t in study.trials:
        saved = yaml.safe_load((out / f"trial_{t.number:04d}" / "config.yaml").read_text())
        assert set(t.params) == set(SPACE)
        for name, value in t.params.items():
            assert saved[name] == value and isinstance(saved[name], bool) == isinstance(value, bool), name
        assert {k: v for k, v in saved.items() if k not in SPACE} == {
            k: v for k, v in fixed.items() if k in saved and k not in SPACE}


@needs_fmnist
def test_best_yaml_trains_the_best_trials_flags(study3):
    out, _, _, study = study3
    best = vars(config.parse_args(["--config", str(out / "best.yaml")]))
    trial = vars(config.parse_args(["--config", str(out / f"trial_{study.best_trial.number:04d}" / "config.yaml")]))
    assert best.pop("config") != trial.pop("config") and best == trial
    assert {k: best[k] for k in SPACE} == study.best_trial.params


@needs_fmnist
def test_a_rerun_resumes_and_report_rewrites(study3, capsys):
    out, space, _, _ = study3
    before = {p: p.stat().st_mtime_ns for p in out.glob("trial_*/summary.json")}
    summary = tune.main(["--space", space, "--n_trials", "3", "--output_dir", str(out), "--seed", "1", *TINY])
    assert summary["states"] == {"complete": 3}
    assert {p: p.stat().st_mtime_ns for p in out.glob("trial_*/summary.json")} == before  # nothing ran again
    (out / "best.yaml").unlink()
    assert tune.main(["--report", "--output_dir", str(out)])["states"] == {"complete": 3}
    assert (out / "best.yaml").is_file()
    err = tune_error(["--space", space, "--n_trials", "3", "--output_dir", str(out), "--seed", "1", *TINY,
                      "--epochs", "3"], capsys)
    assert "study s was started with another train_argv" in err


@needs_fmnist
def test_two_workers_share_one_study(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "tune.py"), "--space", write_space(tmp_path / "s.yaml", SPACE),
           "--n_trials", "3", "--output_dir", str(out), "--storage", f"sqlite:///{out}/shared.db", *TINY]
    out.mkdir()
    workers = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out}/shared.db")
    assert optuna.get_all_study_names(f"sqlite:///{out}/shared.db") == ["s"]  # no lock left behind
    assert sorted((t.number, t.state.name) for t in study.trials) == [(n, "COMPLETE") for n in range(3)]
    assert sorted(p.name for p in out.glob("trial_*")) == [f"trial_{n:04d}" for n in range(3)]
    for n in range(3):  # each trial trained once
        assert (out / f"trial_{n:04d}" / "train.log").read_text().count("done: final") == 1
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3  # seeded apart: no point twice
    ran = [re.findall(r"^trial (\d+) COMPLETE", log, re.M) for log in logs]
    assert all(ran) and sorted(n for r in ran for n in r) == ["0", "1", "2"], logs  # both workers, each trial once


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


@needs_fmnist
def test_a_pruned_trial_is_stopped_and_recorded_as_pruned(tmp_path):
    out, epochs = str(tmp_path / "out"), 40
    storage = tune.open_storage(f"sqlite:///{tmp_path}/study.db")
    meta = {"train_argv": TINY + ["--epochs", str(epochs)], "seed": 0, "trial_minutes": 0,
            "space": tune.load_space(write_space(tmp_path / "s.yaml", {"lr": {"low": 0.05, "high": 0.1}}))}
    study = tune.open_study(storage, "p", AlwaysPrune(), meta)
    tune.optimize(study, storage, 1, out)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = os.path.join(out, "trial_0000")
    with open(os.path.join(run, "metrics.csv")) as f:
        assert 1 <= len(f.readlines()) - 1 < epochs  # stopped early, by SIGTERM, keeping last.pt
    assert os.path.isfile(os.path.join(run, "last.pt")) and not os.path.exists(os.path.join(run, "summary.json"))
    assert "stopped by SIGTERM" in open(os.path.join(run, "console.log")).read()
    assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]


@needs_fmnist
def test_a_trial_is_not_pruned_after_its_last_epoch(tmp_path):
    storage = tune.open_storage(f"sqlite:///{tmp_path}/study.db")
    meta = {"train_argv": TINY + ["--epochs", "1"], "seed": 0, "trial_minutes": 0,
            "space": tune.load_space(write_space(tmp_path / "s.yaml", {"lr": {"low": 0.05, "high": 0.1}}))}
    study = tune.open_study(storage, "p", AlwaysPrune(), meta)
    tune.optimize(study, storage, 1, str(tmp_path / "out"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


@needs_fmnist
@pytest.mark.parametrize("space,fixed,n,reason", [
    ({"lr": {"choices": [1.0e9]}}, [], 2, "loss became non-finite at epoch"),
    ({"swa_start": {"choices": [5]}}, ["--swa"], 1, "--swa_start 5 must be below --epochs 2 (exit 2)"),
], ids=["non-finite-loss", "impossible-combination"])
def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, space, fixed, n, reason):
    out = tmp_path / "out"
    summary = tune.main(["--space", write_space(tmp_path / "s.yaml", space), "--n_trials", str(n), "--output_dir",
                         str(out), *TINY, *fixed])
    assert summary["states"] == {"fail": n} and summary["best_value"] is None
    study = load(out, "s")
    assert all(reason in t.user_attrs["reason"] for t in study.trials)
    _, rows = read_csv(out / "trials.csv")
    assert [r["state"] for r in rows] == ["FAIL"] * n and reason in rows[-1]["reason"]
    assert reason in (out / "report.md").read_text() and not (out / "best.yaml").exists()


def test_counts_leave_interrupted_and_lost_trials_to_a_rerun():
    def trial(state, **attrs):
        return optuna.trial.create_trial(state=state, user_attrs=attrs,
                                         value=0.5 if state == optuna.trial.TrialState.COMPLETE else None)
    S = optuna.trial.TrialState
    assert tune.counts(trial(S.COMPLETE)) and tune.counts(trial(S.PRUNED)) and tune.counts(trial(S.RUNNING))
    assert tune.counts(trial(S.FAIL, reason="loss became non-finite (exit 2)"))
    assert not tune.counts(trial(S.FAIL, reason="interrupted (KeyboardInterrupt)", interrupted=True))
    assert not tune.counts(trial(S.FAIL))  # failed by the heartbeat: its worker died
