"""--ensemble N and --eval_only --ckpt A B: the averaged prediction against a by-hand mean of softmax outputs,
the members' seeds and shared split, and the errors (bad N, clashing flags, mismatched or failed members)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from conftest import QUICK, cli_error, needs_fmnist, run_script

import config
import train
from datasets import build_data
from engine.checkpoint import load_model
from engine.ensemble import Ensemble, member_threads


def _np_softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_ensemble_output_is_the_log_of_the_mean_softmax():
    torch.manual_seed(0)
    members = [nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(5, 4)]
    x = torch.randn(7, 5)
    with torch.no_grad():
        out = Ensemble(members)(x).numpy()
        by_hand = np.mean([_np_softmax(m(x).double().numpy()) for m in members], axis=0)
    np.testing.assert_allclose(np.exp(out), by_hand, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np_softmax(out.astype(np.float64)), by_hand, rtol=1e-5, atol=1e-7)  # valid logits
    # the mean of probabilities is not the mean of logits: a confident member outvotes two unsure ones
    a, b = nn.Linear(1, 2, bias=True), nn.Linear(1, 2, bias=True)
    with torch.no_grad():
        for m, bias in ((a, [0.0, 9.0]), (b, [0.5, 0.0])):
            m.weight.zero_()
            m.bias.copy_(torch.tensor(bias))
    assert Ensemble([a, b, b])(torch.zeros(1, 1)).argmax(1).item() == 1


def test_member_threads_share_the_machine():
    assert member_threads(2, 2) == 1 and member_threads(8, 3) == 2 and member_threads(1, 4) == 1


def _hand_ensemble_acc(ckpts, argv, use_ema=False):
    """Accuracy of the mean softmax of the checkpoints' models on the validation split the flags describe."""
    data = build_data(config.parse_args(argv))
    models = [load_model(str(p), use_ema=use_ema)[0].eval() for p in ckpts]
    probs, labels = [[] for _ in models], []
    with torch.no_grad():
        for x, y in data.val_loader:
            for i, m in enumerate(models):
                probs[i].append(_np_softmax(m(x.float() / 255).double().numpy()))
            labels.append(y.numpy())
    probs = [np.concatenate(p) for p in probs]
    y = np.concatenate(labels)
    single = [float((p.argmax(1) == y).mean()) for p in probs]
    return float((np.mean(probs, axis=0).argmax(1) == y).mean()), single


@needs_fmnist
def test_ensemble_of_two_equals_the_hand_average_and_eval_only_reproduces_it(tmp_path):
    out = tmp_path / "ens"
    flags = [*QUICK, "--epochs", "2", "--threads", "2", "--ema", "--ema_decay", "0.9"]
    r = run_script(["train.py", *flags, "--ensemble", "2", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[m1] epoch 2" in r.stderr + r.stdout  # members' log lines are forwarded
    s = json.loads((out / "summary.json").read_text())
    ckpts = [out / f"member{i}" / "last.pt" for i in range(2)]
    for i, p in enumerate(ckpts):
        cfg = yaml.safe_load((out / f"member{i}" / "config.yaml").read_text())
        assert (cfg["seed"], cfg["data_seed"], cfg["threads"], cfg["ensemble"]) == (i, 0, 1, 1)
    w0, w1 = (torch.load(p, weights_only=True)["model"] for p in ckpts)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())  # different seeds

    acc, single = _hand_ensemble_acc(ckpts, QUICK)
    assert s["ensemble"] == 2 and len(s["members"]) == 2
    assert [m["final_val_acc"] for m in s["members"]] == pytest.approx(single, abs=1e-9)
    assert s["final_val_acc"] == pytest.approx(acc, abs=1e-9) and s["test_acc"] == s["final_val_acc"]
    assert acc > 0.3 and s["wall_seconds"] > 0
    acc_ema, _ = _hand_ensemble_acc(ckpts, QUICK, use_ema=True)  # --ema: the members' EMA weights, averaged too
    assert s["final_val_acc_ema"] == pytest.approx(acc_ema, abs=1e-9) and s["test_acc_ema"] == acc_ema

    train.main(config.parse_args(["--eval_only", "--ckpt", *map(str, ckpts), *QUICK,
                                  "--output_dir", str(tmp_path / "ev")]))
    ev = json.loads((tmp_path / "ev" / "eval_summary.json").read_text())
    assert ev["val_acc"] == pytest.approx(acc, abs=1e-9) and ev["ckpt"] == [str(p) for p in ckpts]


@needs_fmnist
def test_a_failing_member_stops_the_ensemble_with_its_error(tmp_path, capsys):
    flags = [*QUICK, "--scheduler", "onecycle", "--warmup_epochs", "1", "--ensemble", "2",
             "--output_dir", str(tmp_path / "e")]
    err = cli_error(train.main, flags, capsys)  # the members refuse a warmup before onecycle's own
    assert "ensemble member" in err and "pass --warmup_epochs 0" in err and "member" in err.split("output is in")[1]


@needs_fmnist
def test_data_seed_shares_the_validation_split_between_seeds():
    def val_labels(*extra):
        data = build_data(config.parse_args(["--val_ratio", "0.1", "--train_subset", "2000", *extra]))
        return data.val_loader.labels, data.val_loader.images

    a, b, c = val_labels("--seed", "0"), val_labels("--seed", "1", "--data_seed", "0"), val_labels("--seed", "1")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])  # without it the split follows --seed


def _write_ckpt(path, num_classes):
    from models import model_config, model_from_config
    mcfg = model_config("resnet8", num_classes, 1, 28, [0.5], [0.5])
    torch.save({"model": model_from_config(mcfg).state_dict(), "model_config": mcfg,
                "class_names": [str(c) for c in range(num_classes)]}, path)


@pytest.mark.parametrize("argv,fragment", [
    (["--ensemble", "0"], "--ensemble 0: must be in [1, inf)"),
    (["--ensemble", "2", "--eval_only", "--ckpt", "x.pt"], "does not go with --eval_only"),
    (["--ensemble", "3", "--swa"], "does not go with --swa"),
])
def test_bad_ensemble_flags(argv, fragment, tmp_path, capsys):
    assert fragment in cli_error(train.main, [*argv, "--output_dir", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_ensemble_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "not torchrun" in cli_error(train.main, ["--ensemble", "2", "--output_dir", str(tmp_path)], capsys)


@needs_fmnist
def test_mismatched_or_missing_ensemble_checkpoints(tmp_path, capsys):
    _write_ckpt(tmp_path / "a.pt", 10)
    _write_ckpt(tmp_path / "b.pt", 5)
    base = ["--eval_only", *QUICK, "--output_dir", str(tmp_path / "ev")]
    err = cli_error(train.main, [*base, "--ckpt", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")], capsys)
    assert "num_classes 5" in err and "same data" in err
    err = cli_error(train.main, [*base, "--ckpt", str(tmp_path / "a.pt"), str(tmp_path / "gone.pt")], capsys)
    assert "gone.pt not found" in err
