"""Data-parallel training under torchrun (CPU, gloo, 2 processes) checked against one process.

Why 2 x B/2 must equal 1 x B: the loader draws one permutation per (seed, epoch) on every rank
(per-rank seeds only change augmentation) and rank r takes perm[r::2], so the i-th batches of the
two ranks together are perm[iB:(i+1)B], the single process's i-th batch; DDP averages the two
B/2-sample mean gradients into the B-sample mean. A model without BatchNorm or dropout then takes
the same SGD steps up to float rounding. Evaluation shards without padding and sums counts, so
accuracies (counts / n) equal one process's exactly.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PLAIN, ROOT, needs_fmnist

pytestmark = needs_fmnist

N_EVAL = 101  # not divisible by the world size
# --lr_base_batch 32 with the same global batch (2 x 32 = 1 x 64) gives both runs lr 0.05 * 64 / 32 = 0.1,
# but only if the linear scaling rule counts the world size. --scheduler constant keeps the lr checkable
# at the end of the epoch and through --resume with more --epochs.
COMMON = ["--model", "mlp_student", "--no_amp", "--deterministic", "--warmup_epochs", "0",
          "--train_subset", "256", "--eval_subset", str(N_EVAL), "--epochs", "1", "--opt", "sgd",
          "--weight_decay", "0", "--device", "cpu", "--no_progress", "--lr", "0.05", "--lr_base_batch", "32",
          "--scheduler", "constant", "--ema", "--ema_decay", "0.5", *PLAIN]
# 3 epochs of InfoBatch: epochs 2-3 prune from the scores every rank recorded for its shard in the epoch before
INFOBATCH = ["--infobatch", "0.5", "--infobatch_anneal", "1", "--epochs", "3"]
# linear probing for one epoch, then the whole network: DDP must sync the backbone's gradients once it unfreezes
FREEZE = ["--freeze_epochs", "1", "--epochs", "2"]
EVAL = ["--eval_only", "--train_subset", "256", "--eval_subset", str(N_EVAL), "--batch_size", "64",
        "--device", "cpu", "--no_progress", *PLAIN]
RUN_FILES = {"best.pt", "config.yaml", "curves.png", "last.pt", "metrics.csv", "summary.json", "train.log"}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def torchrun(args, cwd):
    # `python -m torch.distributed.run` is torchrun, with no need for the executable on PATH;
    # --standalone starts a local rendezvous on a free port.
    return _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 os.path.join(ROOT, "train.py"), *args], cwd)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All launches once: 2-process epoch 1 (A), its torchrun --resume to epoch 2 (A2), then in one
    interpreter the 1-process runs (B, B2), evaluations of A (E, E_ema) and --sync_bn on CPU (S). N: a
    2-process run of a BatchNorm model (ResNet-8), and E_N / E_N_ema its checkpoint evaluated by one process.
    I / IB: --infobatch with 2 processes / 1 process. F / FB: --freeze_epochs 1 of 2, the same."""
    d = tmp_path_factory.mktemp("ddp")
    out = {"dir": d}
    out["A"] = torchrun([*COMMON, "--batch_size", "32", "--output_dir", "A"], d)
    assert out["A"].returncode == 0, out["A"].stderr[-3000:]
    out["A2"] = torchrun(["--resume", "A/last.pt", "--epochs", "2", "--output_dir", "A2", "--no_progress"], d)
    assert out["A2"].returncode == 0, out["A2"].stderr[-3000:]
    out["N"] = torchrun([*COMMON, "--model", "resnet8", "--batch_size", "32", "--output_dir", "N"], d)
    assert out["N"].returncode == 0, out["N"].stderr[-3000:]
    out["I"] = torchrun([*COMMON, *INFOBATCH, "--batch_size", "32", "--output_dir", "I"], d)
    assert out["I"].returncode == 0, out["I"].stderr[-3000:]
    out["F"] = torchrun([*COMMON, *FREEZE, "--batch_size", "32", "--output_dir", "F"], d)
    assert out["F"].returncode == 0, out["F"].stderr[-3000:]
    groups = [[*COMMON, "--batch_size", "64", "--output_dir", "B"],
              ["--resume", "B/last.pt", "--epochs", "2", "--output_dir", "B2", "--no_progress"],
              [*EVAL, "--ckpt", "A/last.pt", "--output_dir", "E"],
              [*EVAL, "--ckpt", "A/last.pt", "--use_ema", "--output_dir", "E_ema"],
              [*EVAL, "--ckpt", "N/last.pt", "--output_dir", "E_N"],
              [*EVAL, "--ckpt", "N/last.pt", "--use_ema", "--output_dir", "E_N_ema"],
              [*COMMON, *INFOBATCH, "--batch_size", "64", "--output_dir", "IB"],
              [*COMMON, *FREEZE, "--batch_size", "64", "--output_dir", "FB"],
              ["--sync_bn", "--device", "cpu", "--no_progress", "--output_dir", "S"]]  # must fail: last
    argv = [a for g in groups for a in ("--next", *g)][1:]
    out["one"] = _run([os.path.join(ROOT, "tests", "run_many.py"), *argv], d)
    return out


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_two_processes_of_half_batch_match_one_process(runs):
    d = runs["dir"]
    a, b = load(d / "A" / "last.pt"), load(d / "B" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"]["module"], b["ema"]["module"])
    # the runs moved the weights (4 SGD steps at lr 0.1): equality above is not trivial
    assert max((a["model"][k] - a["ema"]["module"][k]).abs().max() for k in a["model"]) > 1e-3
    assert a["args"]["batch_size"] == 32 and b["args"]["batch_size"] == 64


def test_linear_scaling_rule_counts_the_world_size(runs):
    d = runs["dir"]
    for name in ("A", "B"):
        log_text = (d / name / "train.log").read_text()
        assert "linear scaling rule: lr 0.05 x 64/32 = 0.1" in log_text, name
        assert float(metrics(d / name / "metrics.csv")[-1]["lr"]) == pytest.approx(0.1, rel=1e-12)
    assert "world size 2" in (d / "A" / "train.log").read_text()


def test_resume_under_torchrun_continues_the_run(runs):
    d = runs["dir"]
    a2, b2 = load(d / "A2" / "last.pt"), load(d / "B2" / "last.pt")
    assert a2["epoch"] == b2["epoch"] == 2 and len(a2["metrics"]["history"]) == 2
    # epoch 2 reshuffles, and the optimiser state (momentum) and EMA carry over, as in one process
    assert_same_weights(a2["model"], b2["model"])
    assert_same_weights(a2["ema"]["module"], b2["ema"]["module"])
    assert max((a2["model"][k] - load(d / "A" / "last.pt")["model"][k]).abs().max() for k in a2["model"]) > 1e-3
    # every rank saved and restored its own RNG stream (augmentation), not rank 0's
    for ckpt in (load(d / "A" / "last.pt"), a2):
        states = ckpt["rng_ranks"]
        assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
        assert torch.equal(states[0]["torch"], ckpt["rng"]["torch"])
    assert "resumed from A/last.pt at epoch 1" in runs["A2"].stdout
    assert "augmentation streams restart" not in runs["A2"].stdout + runs["A2"].stderr


def test_distributed_evaluation_equals_one_process(runs):
    d = runs["dir"]
    summary = json.loads((d / "A" / "summary.json").read_text())
    row = metrics(d / "A" / "metrics.csv")[-1]
    for ev_dir, acc_key, loss_key in (("E", "final_val_acc", "val_loss"),
                                      ("E_ema", "final_val_acc_ema", "val_loss_ema")):
        ev = json.loads((d / ev_dir / "eval_summary.json").read_text())
        # counts / n over all 101 samples: no sample dropped, padded or counted twice
        assert summary[acc_key] == ev["val_acc"], ev_dir
        assert round(ev["val_acc"] * N_EVAL) == pytest.approx(ev["val_acc"] * N_EVAL, abs=1e-9)
        # the loss sums floats in another order (two shards of 51 + 50): equal up to rounding
        assert float(row[loss_key]) == pytest.approx(ev["val_loss"], rel=1e-6), ev_dir
    assert summary["final_val_acc5"] == json.loads((d / "E" / "eval_summary.json").read_text())["val_acc5"]


def test_batchnorm_statistics_are_averaged_so_ranks_evaluate_the_saved_model(runs):
    """Without --sync_bn each rank's running statistics come from its own shard. They are averaged over ranks
    at the end of every epoch, so the distributed evaluation is of one model, the one saved: a single process
    evaluating the checkpoint gets the same loss (and EMA's buffers likewise)."""
    d = runs["dir"]
    row = metrics(d / "N" / "metrics.csv")[-1]
    for ev_dir, loss_key in (("E_N", "val_loss"), ("E_N_ema", "val_loss_ema")):
        ev = json.loads((d / ev_dir / "eval_summary.json").read_text())
        assert float(row[loss_key]) == pytest.approx(ev["val_loss"], rel=1e-6), ev_dir
    bn = load(d / "N" / "last.pt")["model"]
    assert any(k.endswith("running_mean") for k in bn)


def test_outputs_and_logs_come_from_rank_0_only(runs):
    d = runs["dir"]
    assert {p.name for p in (d / "A").iterdir()} == RUN_FILES
    # best.pt only when the resumed epoch beat the saved best, as in one process
    assert {p.name for p in (d / "A2").iterdir()} | {"best.pt"} == RUN_FILES
    # no stray run directory (rank 1 would default to runs/...) next to the ones asked for
    assert {p.name for p in d.iterdir()} == {"A", "A2", "B", "B2", "E", "E_ema", "N", "E_N", "E_N_ema", "I", "IB", "F",
                                            "FB"}
    for name, proc in (("A", runs["A"]), ("A2", runs["A2"])):
        log_text = (d / name / "train.log").read_text()
        epochs = int(metrics(d / name / "metrics.csv")[-1]["epoch"])
        assert log_text.count(f"epoch {epochs} | train_loss") == 1, name
        assert proc.stdout.count(f"epoch {epochs} | train_loss") == 1, name
        assert proc.stdout.count("done: final") == 1 and log_text.count("done: final") == 1, name
        assert len(metrics(d / name / "metrics.csv")) == epochs


def test_sync_bn_on_cpu_is_a_one_line_error(runs):
    one = runs["one"]
    assert one.returncode == 2, one.stderr[-2000:]
    err = one.stderr.strip().splitlines()
    assert err[-1].startswith("error: --sync_bn needs CUDA"), one.stderr[-2000:]
    assert "Traceback" not in one.stderr
    assert not (runs["dir"] / "S").exists()


def test_helpers_in_a_two_process_group(tmp_path):
    import torch.multiprocessing as mp
    from ddp_worker import run, small_model
    mp.spawn(run, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    assert r0["info"] == (0, 2, 0, True, True) and r1["info"] == (1, 2, 1, False, True)
    assert r0["sums"] == r1["sums"] == [1.5, 2.0, 2.0 * 2**40 + 1]  # float64: exact
    # broadcast_module: rank 1 ends with rank 0's weights and buffers; rank 0 keeps its own
    assert not torch.equal(r0["before"]["0.weight"], r1["before"]["0.weight"])
    for k in r0["before"]:
        assert torch.equal(r0["after"][k], r0["before"][k]) and torch.equal(r1["after"][k], r0["before"][k]), k
    assert torch.equal(r0["before"]["0.weight"], small_model(seed=100)[0].weight.detach())
    assert r0["channels_last"] and r1["channels_last"]
    # average_buffers: float buffers averaged, the integer counter kept per rank
    for r, bn in ((0, r0["bn"]), (1, r1["bn"])):
        torch.testing.assert_close(bn["running_mean"], torch.tensor([1.5, 3.0, 4.5]))
        torch.testing.assert_close(bn["running_var"], torch.tensor([1.0, 1.5, 4.5]))
        assert int(bn["num_batches_tracked"]) == 3 + r
    assert r0["finite"] == r1["finite"] == (True, False, False)
    for r in (r0, r1):
        assert [g["rank"] for g in r["gathered"]] == [0, 1]
        assert torch.equal(r["gathered"][1]["t"], torch.tensor([10, 11, 12]))


def test_rank_batches_together_are_the_single_process_batch():
    """The loader property the weight equality rests on, and exact-once evaluation sharding."""
    from datasets.loader import InMemoryLoader
    n, batch = 256, 64
    images = torch.arange(n, dtype=torch.int64).to(torch.uint8).view(n, 1, 1, 1)  # unused pixels
    labels = torch.arange(n)  # each label names its sample

    def batches(rank, world, size, shuffle=True, count=n, epoch=3):
        loader = InMemoryLoader(images[:count], labels[:count], size, shuffle, seed=7, drop_last=shuffle,
                                rank=rank, world_size=world)
        loader.set_epoch(epoch)
        return [y for _, y in loader]

    one = batches(0, 1, batch)
    two = list(zip(batches(0, 2, batch // 2), batches(1, 2, batch // 2)))
    assert len(one) == len(two) == n // batch
    for b1, (r0, r1) in zip(one, two):
        assert sorted(b1.tolist()) == sorted(r0.tolist() + r1.tolist())
    assert not torch.equal(torch.cat(one), torch.cat(batches(0, 1, batch, epoch=4)))  # reshuffled per epoch
    # evaluation: 101 samples over 2 ranks, each exactly once, no padding
    ev = [torch.cat(batches(r, 2, 32, shuffle=False, count=N_EVAL)) for r in (0, 1)]
    assert sorted(torch.cat(ev).tolist()) == list(range(N_EVAL))


def test_infobatch_under_torchrun_matches_one_process(runs):
    # the ranks share their scores after each epoch, so both select the same samples and take the same steps
    d = runs["dir"]
    i, ib = load(d / "I" / "last.pt"), load(d / "IB" / "last.pt")
    samples = [int(r["train_samples"]) for r in metrics(d / "I" / "metrics.csv")]
    assert samples == [int(r["train_samples"]) for r in metrics(d / "IB" / "metrics.csv")]
    assert samples[0] == 256 and all(s < 256 for s in samples[1:])
    torch.testing.assert_close(i["infobatch"]["scores"], ib["infobatch"]["scores"], rtol=0, atol=1e-5)
    assert_same_weights(i["model"], ib["model"])


def test_freeze_then_unfreeze_under_torchrun_matches_one_process(runs):
    # a backbone whose gradients the ranks did not average after it unfroze would leave rank 0 on its own
    # half-batch steps (or, with none sent, at its initial weights): either differs from one process's run
    d = runs["dir"]
    f, fb, b2 = (load(d / name / "last.pt") for name in ("F", "FB", "B2"))
    assert f["epoch"] == fb["epoch"] == 2
    assert_same_weights(f["model"], fb["model"])
    assert_same_weights(f["ema"]["module"], fb["ema"]["module"])
    # the frozen epoch mattered: the same 2 epochs without it end elsewhere
    assert max((f["model"][k] - b2["model"][k]).abs().max() for k in f["model"]) > 1e-3
