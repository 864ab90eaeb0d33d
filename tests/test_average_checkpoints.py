"""Checkpoint averaging: weighted mean in float64, key checks, the CLI and its BatchNorm re-estimation."""
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import config
import datasets
import models
from models.drop_path import DropPath
from tools.average_checkpoints import average_state_dicts, main
from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(2, 3, generator=g), "d": torch.randn(4, generator=g, dtype=torch.float64),
            "h": torch.randn(3, generator=g).half(), "n": torch.tensor(10 + seed), "flag": torch.tensor(seed % 2 == 0)}


def weighted_mean(tensors, weights):
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return torch.einsum("i,i...->...", w, torch.stack([t.double() for t in tensors]))


def test_weighted_mean_in_float64_and_integer_buffers_from_last():
    sds = [make_sd(s) for s in (1, 2, 3)]
    avg, skipped = average_state_dicts(sds, [0.2, 0.3, 0.5])
    assert skipped == [] and list(avg) == list(sds[-1])
    for k in ("w", "d", "h"):
        assert avg[k].dtype == sds[0][k].dtype
    torch.testing.assert_close(avg["d"], weighted_mean([sd["d"] for sd in sds], [0.2, 0.3, 0.5]),
                               rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(avg["w"], weighted_mean([sd["w"] for sd in sds], [0.2, 0.3, 0.5]).float())
    torch.testing.assert_close(avg["h"], weighted_mean([sd["h"] for sd in sds], [0.2, 0.3, 0.5]).half())
    assert int(avg["n"]) == 13 and avg["n"].dtype == torch.int64
    assert bool(avg["flag"]) is False  # seed 3: copied from the last, not averaged


def test_float64_accumulation_of_float32_weights():
    # Exact answer 0.5 * 2**24 + 0.25 * 2 + 0.25 * 2 = 2**23 + 1 is a float32 number, but a float32 running
    # sum rounds 2**23 + 0.5 back to 2**23 (ties to even) twice and ends at 2**23.
    sds = [{"x": torch.tensor([v], dtype=torch.float32)} for v in (2.0 ** 24, 2.0, 2.0)]
    avg, _ = average_state_dicts(sds, [0.5, 0.25, 0.25])
    assert avg["x"].dtype == torch.float32 and avg["x"].item() == 2 ** 23 + 1


def test_weights_normalised_and_default_equal(caplog):
    sds = [make_sd(s) for s in (1, 2, 3)]
    with caplog.at_level(logging.INFO, logger="tools.average_checkpoints"):
        a, _ = average_state_dicts(sds, [2, 3, 5])
    assert "normalised" in caplog.text
    b, _ = average_state_dicts(sds, [0.2, 0.3, 0.5])
    torch.testing.assert_close(a["d"], b["d"], rtol=1e-15, atol=1e-15)
    eq, _ = average_state_dicts(sds)
    torch.testing.assert_close(eq["d"], weighted_mean([sd["d"] for sd in sds], [1, 1, 1]), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("weights,match", [([0.5, -0.5], "positive"), ([1.0, 0.0], "positive"),
                                           ([1.0], "one weight per checkpoint")])
def test_bad_weights(weights, match):
    with pytest.raises(UserError, match=match):
        average_state_dicts([make_sd(1), make_sd(2)], weights)


def test_key_mismatches_named_when_strict_and_skipped_when_not(caplog):
    sds = [make_sd(s) for s in (1, 2, 3)]
    del sds[0]["d"]  # missing in the first
    sds[1]["w"] = torch.zeros(3, 3)  # shape differs in the second
    sds[2]["only_last"] = torch.ones(2)
    with pytest.raises(UserError) as e:
        average_state_dicts(sds, None, strict=True, names=["a.pt", "b.pt", "c.pt"])
    msg = str(e.value)
    assert "3 key(s)" in msg and "d (missing in a.pt)" in msg and "only_last (missing in a.pt, b.pt)" in msg
    assert "w (shapes [2, 3] in a.pt, [3, 3] in b.pt, [2, 3] in c.pt)" in msg and "\n" not in msg
    with caplog.at_level(logging.WARNING):
        avg, skipped = average_state_dicts(sds, None, strict=False)
    assert sorted(skipped) == ["d", "only_last", "w"] and "skipped 3 key(s)" in caplog.text
    for k in skipped:
        assert torch.equal(avg[k], sds[2][k])  # kept from the last checkpoint
    torch.testing.assert_close(avg["h"], weighted_mean([sd["h"] for sd in sds], [1, 1, 1]).half())


# ---- the command line ---------------------------------------------------------------------------

def tiny_model():
    return nn.Sequential(nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))


def write_ckpts(tmp_path, n=3):
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        m, e = tiny_model(), tiny_model()
        with torch.no_grad():
            for mod in (m, e):
                mod[0].running_mean.normal_()
                mod[0].num_batches_tracked.fill_(100 + i)
        ckpt = {"model": m.state_dict(), "model_config": {"name": "tiny"}, "class_names": ["a", "b", "c"],
                "args": {"batch_size": 64, "dataset": "fashion_mnist"}, "optimizer": {"state": {}},
                "scheduler": {"x": 1}, "scaler": {}, "ema": {"module": e.state_dict(), "num_updates": 5},
                "epoch": i + 1, "best_val_acc": 0.5, "metrics": {}}
        paths.append(str(tmp_path / f"e{i}.pt"))
        torch.save(ckpt, paths[-1])
    return paths


@pytest.mark.parametrize("use_ema", [False, True])
def test_cli_writes_a_normal_checkpoint(tmp_path, use_ema):
    paths = write_ckpts(tmp_path)
    out = str(tmp_path / "avg.pt")
    main([*paths, "--weights", "1", "1", "2", "--out", out] + (["--use_ema"] if use_ema else []))
    ckpt = torch.load(out, weights_only=True)
    ins = [torch.load(p, weights_only=True) for p in paths]
    sds = [c["ema"]["module"] if use_ema else c["model"] for c in ins]
    assert ckpt["averaged_from"] == paths and ckpt["weights"] == pytest.approx([0.25, 0.25, 0.5])
    assert ckpt["optimizer"] is None and ckpt["scheduler"] is None and ckpt["ema"] is None
    assert ckpt["epoch"] == 3 and ckpt["args"] == ins[-1]["args"] and ckpt["model_config"] == {"name": "tiny"}
    for k in ("0.weight", "0.running_mean", "3.weight"):
        torch.testing.assert_close(ckpt["model"][k], weighted_mean([sd[k] for sd in sds], [1, 1, 2]).float())
    assert int(ckpt["model"]["0.num_batches_tracked"]) == 102
    model = tiny_model()
    model.load_state_dict(ckpt["model"])  # loads into the model as-is


def test_cli_refuses_to_overwrite_an_input(tmp_path):
    paths = write_ckpts(tmp_path, 2)
    before = os.path.getmtime(paths[0])
    with pytest.raises(UserError, match="one of the input checkpoints"):
        main([*paths, "--out", os.path.join(str(tmp_path), ".", "e0.pt")])
    assert os.path.getmtime(paths[0]) == before


def test_cli_bad_weight_exits_2_with_message(tmp_path):
    paths = write_ckpts(tmp_path, 2)
    r = subprocess.run([sys.executable, "-m", "tools.average_checkpoints", *paths, "--weights", "0.5", "-1",
                        "--out", str(tmp_path / "avg.pt")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "positive" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "avg.pt")


def test_cli_update_bn_uses_the_runs_data(tmp_path, monkeypatch):
    paths = write_ckpts(tmp_path, 2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 2, 4, 4), generator=g, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
               for _ in range(3)]
    seen = {}

    def build_data(args):
        seen["args"] = args
        return types.SimpleNamespace(train_loader=batches)

    def model_from_config(cfg):
        seen["cfg"] = cfg
        return tiny_model()

    monkeypatch.setattr(datasets, "build_data", build_data, raising=False)
    monkeypatch.setattr(models, "model_from_config", model_from_config, raising=False)
    out = str(tmp_path / "avg.pt")
    main([*paths, "--out", out, "--update_bn", "--device", "cpu"])
    args = seen["args"]
    assert args.batch_size == 64  # the saved value; the parser default for flags the run did not save
    assert args.lr == config.get_parser().get_default("lr") and args.epochs == config.get_parser().get_default("epochs")
    assert seen["cfg"] == {"name": "tiny"}
    sd = torch.load(out, weights_only=True)["model"]
    # BN is the first layer: its input is the pixels; momentum=None averages the equal-size batch means.
    x = torch.cat([b for b, _ in batches]).double() / 255
    torch.testing.assert_close(sd["0.running_mean"].double(), x.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    var = torch.stack([(b.double() / 255).var(dim=(0, 2, 3)) for b, _ in batches]).mean(0)
    torch.testing.assert_close(sd["0.running_var"].double(), var, rtol=1e-5, atol=1e-6)
    assert int(sd["0.num_batches_tracked"]) == 3
    ins = [torch.load(p, weights_only=True)["model"] for p in paths]
    torch.testing.assert_close(sd["3.weight"], weighted_mean([s["3.weight"] for s in ins], [1, 1]).float())


def noisy_model():
    """Dropout before the first BatchNorm, DropPath before the second (no parameters of their own)."""
    return nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(2), DropPath(0.5), nn.BatchNorm2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))


def test_cli_update_bn_runs_with_dropout_and_drop_path_off(tmp_path, monkeypatch):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        m = noisy_model()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        paths.append(str(tmp_path / f"n{i}.pt"))
        torch.save({"model": m.state_dict(), "model_config": {"name": "noisy"}, "args": {}}, paths[-1])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 2, 4, 4), generator=g, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
               for _ in range(3)]
    monkeypatch.setattr(datasets, "build_data", lambda args: types.SimpleNamespace(train_loader=batches),
                        raising=False)
    monkeypatch.setattr(models, "model_from_config", lambda cfg: noisy_model(), raising=False)
    out = str(tmp_path / "avg.pt")
    main([*paths, "--out", out, "--update_bn", "--device", "cpu"])
    sd = torch.load(out, weights_only=True)["model"]
    # By hand, Dropout and DropPath as the identity: BN 1 sees the pixels; BN 2 sees BN 1's train-mode output
    # (each batch normalised by its own statistics, then the averaged γ, β); momentum=None averages the batches.
    F = torch.nn.functional
    w1, b1 = sd["1.weight"].double(), sd["1.bias"].double()
    stats = {1: [], 3: []}
    for x, _ in batches:
        x = x.double() / 255
        h = F.batch_norm(x, None, None, w1, b1, training=True, eps=1e-5)
        for i, f in ((1, x), (3, h)):
            stats[i].append((f.mean(dim=(0, 2, 3)), f.var(dim=(0, 2, 3), unbiased=True)))
    for i, s in stats.items():
        torch.testing.assert_close(sd[f"{i}.running_mean"].double(), torch.stack([m for m, _ in s]).mean(0),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd[f"{i}.running_var"].double(), torch.stack([v for _, v in s]).mean(0),
                                   rtol=1e-5, atol=1e-6)


def test_cli_data_flags_given_override_the_checkpoints(tmp_path, monkeypatch):
    paths = write_ckpts(tmp_path, 2)
    seen = {}

    def build_data(args):
        seen["args"] = args
        return types.SimpleNamespace(train_loader=[])

    monkeypatch.setattr(datasets, "build_data", build_data, raising=False)
    monkeypatch.setattr(models, "model_from_config", lambda cfg: tiny_model(), raising=False)
    monkeypatch.setattr("tools.average_checkpoints.update_bn_uint8", lambda *a: None)
    main([*paths, "--out", str(tmp_path / "avg.pt"), "--update_bn", "--device", "cpu", "--dataset", "cifar10",
          "--data_dir", "elsewhere"])  # the checkpoints say fashion_mnist, batch_size 64
    args = seen["args"]
    assert (args.dataset, args.data_dir, args.batch_size, args.download) == ("cifar10", "elsewhere", 64, False)


def test_cli_help_is_short_and_a_bad_flag_is_one_error_line():
    r = subprocess.run([sys.executable, "-m", "tools.average_checkpoints", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) <= 80, r.stdout
    assert "--no_strict" in r.stdout and "--data_dir" in r.stdout and "--mixup_alpha" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "tools.average_checkpoints", "a.pt", "--out", "b.pt", "--lr", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: unrecognized arguments: --lr 1; see --help\n", r.stderr
