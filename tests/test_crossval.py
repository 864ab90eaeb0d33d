"""--kfold K --fold all (crossval.py): a normal run per fold; out-of-fold predictions that name every held-out image
once, each scored by the one fold model that did not train on it (checked against the images themselves); the fold
ensemble against a mean softmax computed here; skip and resume on rerun; --jobs 2 = --jobs 1; bad flags; and
predict.py / ablate.py / train_distill.py on the folds. Tiny runs: 300 Fashion-MNIST images, mlp_student, CPU."""
import csv
import json
import logging
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import PLAIN, cli_error, needs_fmnist
from PIL import Image

import ablate
import config
import datasets
import predict
import train
import train_distill
from datasets.fashion_mnist import load_fashion_mnist
from datasets.split import kfold_split
from engine.checkpoint import load_checkpoint, load_model
from utils.errors import Interrupted, UserError

QUICK = ["--model", "mlp_student", "--train_subset", "300", "--eval_subset", "100", "--batch_size", "64",
         "--epochs", "1", "--warmup_epochs", "0", "--device", "cpu", "--no_progress", "--deterministic",
         "--threads", "1", *PLAIN]
CV = [*QUICK, "--kfold", "3", "--fold", "all"]


def cross_validate(out, *extra, parser=None, build_loss=None, script="train.py"):
    """`python train.py ... --fold all --output_dir OUT` in this interpreter; returns cv_summary.json's content."""
    return train.run(config.parse_args([*CV, "--output_dir", str(out), *map(str, extra)], parser=parser),
                     build_loss, script)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fold_models(out, k=3):
    return [load_model(str(out / f"fold{i}" / "last.pt"))[0].eval() for i in range(k)]


def softmax(models, x):
    with torch.no_grad():
        return [m(x.float() / 255).softmax(1) for m in models]


def held_out_test_split(out):
    """The test split the folds are scored on (Fashion-MNIST's test images, --eval_subset of them), built here
    from the flags of fold 0's checkpoint."""
    saved = load_checkpoint(str(out / "fold0" / "last.pt"))["args"]
    data = datasets.build_data(config.training_defaults(saved))
    xs, ys = zip(*data.test_loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """One 3-fold run, placed where ablate.py would put the baseline's seed 0 (see test_ablate_...)."""
    out = tmp_path_factory.mktemp("cv") / "ablation" / "baseline" / "seed0"
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        summary = cross_validate(out)
    finally:  # train.log handlers of the run: leave the module's other tests pytest's own
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return out, summary


@needs_fmnist
def test_three_folds_oof_predictions_and_summary(cv):
    out, summary = cv
    assert summary == json.loads((out / "cv_summary.json").read_text())
    # every fold is a normal run of the same command with --fold i
    for i in range(3):
        assert (out / f"fold{i}" / "summary.json").is_file() and (out / f"fold{i}" / "best.pt").is_file()
        saved = yaml.safe_load((out / f"fold{i}" / "config.yaml").read_text())
        assert (saved["fold"], saved["kfold"], saved["jobs"]) == (i, 3, 1)

    train_x, train_y, _, _ = load_fashion_mnist("data")
    class_names = load_checkpoint(str(out / "fold0" / "last.pt"))["class_names"]
    rows = read_rows(out / "oof_predictions.csv")
    assert list(rows[0]) == ["sample", "fold", "label", "pred", *class_names]
    ids = [int(r["sample"]) for r in rows]
    assert len(rows) == 300 and len(set(ids)) == 300 and ids == sorted(ids)  # every held-out image exactly once
    probs = np.array([[float(r[c]) for c in class_names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r["label"] for r in rows] == [class_names[int(train_y[i])] for i in ids]  # the id indexes train
    assert all(float(r[r["pred"]]) == p.max() for r, p in zip(rows, probs))

    # each row is the softmax of the one fold model whose training split left that image out
    models = fold_models(out)
    for i, model in enumerate(models):
        mine = [k for k, r in enumerate(rows) if r["fold"] == str(i)]
        fold_ids = [ids[k] for k in mine]
        assert len(mine) == summary["folds"][i]["val_samples"] == 100
        assert set(fold_ids) <= set(kfold_split(train_y.numpy(), 3, i, 0)[1].tolist())  # held out by fold i
        np.testing.assert_allclose(probs[mine], softmax([model], train_x[fold_ids])[0].numpy(), atol=2e-6)
        fold_summary = json.loads((out / f"fold{i}" / "summary.json").read_text())
        assert summary["folds"][i]["val_acc"] == pytest.approx(fold_summary["final_val_acc"], abs=1e-12)
        assert summary["folds"][i]["epochs"] == 1

    accs = [f["val_acc"] for f in summary["folds"]]
    assert summary["oof_acc"] == pytest.approx(np.mean([r["label"] == r["pred"] for r in rows]), abs=1e-12)
    assert summary["oof_acc"] == pytest.approx(np.mean(accs), abs=1e-12)  # equal folds: the mean of the folds
    assert summary["val_acc_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
    assert summary["fold_model"] == "last.pt" and summary["oof_samples"] == 300

    # the fold ensemble on the test split: the mean of the three softmax outputs, computed here
    x, y = held_out_test_split(out)
    assert len(y) == 100
    each = softmax(models, x)
    for i, p in enumerate(each):
        assert summary["folds"][i]["test_acc"] == pytest.approx((p.argmax(1) == y).double().mean().item(), abs=1e-12)
    hand = (torch.stack(each).mean(0).argmax(1) == y).double().mean().item()
    assert summary["test_acc_ensemble"] == pytest.approx(hand, abs=1e-12)


@needs_fmnist
def test_rerun_skips_finished_folds(cv):
    out, summary = cv
    mtimes = [os.stat(out / f"fold{i}" / "last.pt").st_mtime_ns for i in range(3)]
    before = (out / "oof_predictions.csv").read_text()
    again = cross_validate(out)
    assert [os.stat(out / f"fold{i}" / "last.pt").st_mtime_ns for i in range(3)] == mtimes
    log = (out / "train.log").read_text()
    for i in range(3):
        assert f"fold {i} of 3: finished ({out}/fold{i}/summary.json), skipped" in log
    assert (out / "oof_predictions.csv").read_text() == before
    assert {k: v for k, v in again.items() if k != "wall_seconds_this_call"} == \
        {k: v for k, v in summary.items() if k != "wall_seconds_this_call"}


@needs_fmnist
def test_jobs_2_gives_the_oof_predictions_of_jobs_1(cv, tmp_path):
    out, _ = cv
    summary = cross_validate(tmp_path / "j2", "--jobs", "2")  # child processes, 1 thread each (--threads 1)
    assert (tmp_path / "j2" / "oof_predictions.csv").read_text() == (out / "oof_predictions.csv").read_text()
    assert all((tmp_path / "j2" / f"fold{i}.out").is_file() for i in range(3))
    assert summary["test_acc_ensemble"] == cv[1]["test_acc_ensemble"]


@needs_fmnist
def test_an_interrupted_fold_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "cv"
    calls, original = [], train.train_one_epoch

    def stop_in_fold_1_epoch_2(*a, **kw):
        calls.append(a[7])
        if len(calls) == 4:  # fold 0: epochs 0, 1; fold 1: epoch 0, then Ctrl-C in epoch 1
            raise KeyboardInterrupt
        return original(*a, **kw)
    monkeypatch.setattr(train, "train_one_epoch", stop_in_fold_1_epoch_2)
    with pytest.raises(Interrupted) as e:
        cross_validate(out, "--epochs", "2")
    assert "same command" in e.value.hint and calls == [0, 1, 0, 1]
    assert (out / "fold0" / "summary.json").is_file() and not (out / "fold1" / "summary.json").exists()
    assert load_checkpoint(str(out / "fold1" / "last.pt"))["epoch"] == 1 and not (out / "fold2").exists()
    monkeypatch.undo()

    summary = cross_validate(out, "--epochs", "2")
    log = (out / "train.log").read_text()
    assert "fold 0 of 3: finished" in log and f"fold 1 of 3: resuming from {out}/fold1/last.pt" in log
    assert "resumed from" in (out / "fold1" / "train.log").read_text()
    assert len(read_rows(out / "fold1" / "metrics.csv")) == 2 and summary["folds"][1]["epochs"] == 2
    # the resumed fold ends where an uninterrupted one does (bit-exact resume on the CPU)
    ref = train.main(config.parse_args([*QUICK, "--epochs", "2", "--kfold", "3", "--fold", "1",
                                        "--output_dir", str(tmp_path / "ref")]))
    assert summary["folds"][1]["val_acc"] == ref["final_val_acc"]
    resumed, plain = (load_checkpoint(str(d / "last.pt"))["model"] for d in (out / "fold1", tmp_path / "ref"))
    for k in plain:
        torch.testing.assert_close(resumed[k], plain[k], rtol=0, atol=0)


@needs_fmnist
@pytest.mark.parametrize("argv, fragment", [
    (["--fold", "all"], "--fold all trains every fold and needs --kfold K"),
    (["--fold", "all", "--kfold", "1"], "needs --kfold K with K >= 2"),
    (["--fold", "all", "--kfold", "3", "--ensemble", "2"], "--fold all does not go with --ensemble"),
    (["--fold", "all", "--kfold", "3", "--eval_only", "--ckpt", "x.pt"], "evaluate their ensemble"),
    (["--kfold", "3", "--fold", "1", "--jobs", "2"], "--jobs 2 trains several folds at once and needs"),
    (["--jobs", "0"], "--jobs 0: must be in [1, inf)"),
    (["--fold", "-1"], "argument --fold: '-1' is not a fold"),
    (["--fold", "seven"], "argument --fold: 'seven' is not a fold"),
    (["--kfold", "3", "--fold", "3"], "--fold 3 is out of range for --kfold 3"),
])
def test_bad_fold_flags_are_one_line_errors(argv, fragment, tmp_path, capsys):
    line = cli_error(train.run, [*QUICK, "--output_dir", str(tmp_path / "r"), *argv], capsys)
    assert fragment in line


@needs_fmnist
def test_a_rerun_with_other_flags_and_resume_are_refused(cv, tmp_path, capsys):
    out, _ = cv
    line = cli_error(train.run, [*CV, "--output_dir", str(out), "--lr", "0.1"], capsys)
    assert "holds folds trained with lr=0.2 but this command gives lr=0.1" in line
    line = cli_error(train.run, [*CV, "--resume", str(out / "fold0" / "last.pt")], capsys)
    assert "--fold all resumes by itself" in line
    bad = tmp_path / "c.yaml"
    bad.write_text("fold: -1\n")
    assert "fold" in cli_error(train.run, ["--config", str(bad)], capsys)


@needs_fmnist
def test_predict_with_the_fold_checkpoints_is_their_mean_softmax(cv, tmp_path):
    out, summary = cv
    ckpts = [str(out / f"fold{i}" / "last.pt") for i in range(3)]
    res = predict.main(["--ckpt", *ckpts, "--split", "test", "--out", str(tmp_path / "p.csv"), "--topk", "10",
                        "--device", "cpu", "--no_progress"])
    rows = read_rows(tmp_path / "p.csv")
    x, y = held_out_test_split(out)
    hand = torch.stack(softmax(fold_models(out), x)).mean(0)
    class_names = load_checkpoint(ckpts[0])["class_names"]
    got = np.array([[dict((r[f"pred_{j}"], float(r[f"prob_{j}"])) for j in range(1, 11))[c] for c in class_names]
                    for r in rows])
    np.testing.assert_allclose(got, hand.numpy(), atol=2e-6)
    assert [r["label"] for r in rows] == [class_names[int(t)] for t in y]
    assert res["accuracy"] == pytest.approx((hand.argmax(1) == y).double().mean().item(), abs=1e-12)
    assert res["accuracy"] == pytest.approx(summary["test_acc_ensemble"], abs=1e-12)


@needs_fmnist
def test_ablate_scores_a_cross_validated_base_by_its_oof_accuracy(cv, tmp_path):
    out, summary = cv  # <ablation>/baseline/seed0, the run ablate.py would have made for this spec
    base = {"model": "mlp_student", "train_subset": 300, "eval_subset": 100, "batch_size": 64, "epochs": 1,
            "warmup_epochs": 0, "device": "cpu", "deterministic": True, "kfold": 3, "fold": "all",
            "label_smoothing": 0.0, "hflip": 0.0, "infobatch": 0.0, "tta": False, "amp": False, "eval_interval": 1}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": base, "variants": [{"name": "baseline"}], "seeds": 1}))
    variants, runs = ablate.plan(ablate.load_spec(str(spec)), str(out.parent.parent), [0], 1)
    assert variants[0]["metric"] == "oof_acc" and runs[0]["status"] == "done"
    assert ablate.main([str(spec), "--out", str(out.parent.parent)]) == 0
    result = json.loads((out.parent.parent / "ablation.json").read_text())["results"]
    assert result["variants"][0]["mean"] == summary["oof_acc"]

    # an unfinished cross-validation reruns its own command (no --resume: crossval.py resumes its folds)
    (tmp_path / "o" / "baseline" / "seed0" / "fold0").mkdir(parents=True)
    (tmp_path / "o" / "baseline" / "seed0" / "fold0" / "last.pt").write_bytes(b"")
    _, runs = ablate.plan(ablate.load_spec(str(spec)), str(tmp_path / "o"), [0], 1)
    assert runs[0]["status"] == "resume" and "--resume" not in runs[0]["cmd"]
    spec.write_text(yaml.safe_dump({"base": {**base, "kfold": 0}, "variants": [{"name": "baseline"}]}))
    with pytest.raises(UserError, match="fold: all cross-validates and needs kfold"):
        ablate.plan(ablate.load_spec(str(spec)), str(tmp_path / "o2"), [0], 1)


def write_folder(root, classes, per_class, rng):
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{k}.png")


def test_image_files_are_named_by_file_and_all_held_out_once(tmp_path):
    """An image folder without subsets: the OOF file lists every training image once, by its file name; no test
    split, so no test accuracy."""
    write_folder(tmp_path / "data", ["a", "b", "c"], 6, np.random.default_rng(0))
    summary = train.run(config.parse_args([
        "--dataset", "imagefolder", "--data_dir", str(tmp_path / "data"), "--img_size", "8", "--model",
        "mlp_student", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--device", "cpu",
        "--no_progress", "--kfold", "3", "--fold", "all", "--output_dir", str(tmp_path / "cv")]))
    rows = read_rows(tmp_path / "cv" / "oof_predictions.csv")
    names = sorted(os.path.join(c, f"{k}.png") for c in "abc" for k in range(6))
    assert sorted(r["sample"] for r in rows) == names and all(r["label"] == r["sample"][0] for r in rows)
    assert sorted(r["fold"] for r in rows) == sorted(str(i) for i in range(3) for _ in range(6))
    assert "test_acc_ensemble" not in summary and "test_acc" not in summary["folds"][0]
    assert summary["oof_acc"] == pytest.approx(np.mean([r["label"] == r["pred"] for r in rows]), abs=1e-12)


@needs_fmnist
def test_train_distill_cross_validates_the_student(cv, tmp_path):
    teacher = str(cv[0] / "fold0" / "last.pt")
    summary = cross_validate(tmp_path / "kd", "--kfold", "2", "--teacher_ckpt", teacher,
                             parser=train_distill.get_parser(), build_loss=train_distill.build_teacher_loss,
                             script="train_distill.py")
    assert summary["kfold"] == 2 and summary["oof_samples"] == 200
    for i in range(2):
        assert "teacher_val_acc" in json.loads((tmp_path / "kd" / f"fold{i}" / "summary.json").read_text())
