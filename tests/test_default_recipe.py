"""The default recipe itself: `python train.py` with no flags is configs/default.yaml, its `auto` settings resolve
as documented, and a run with the defaults prunes, evaluates once and records what it decided."""
import json
import os

import pytest
import yaml
from conftest import ROOT, needs_fmnist

import config
import train
from utils.errors import UserError


def _resolved(argv, distill=False):
    args = config.parse_args(argv)
    train.check_args(args, distill=distill)
    return args


def test_no_flags_is_configs_default_yaml_and_the_reference_is_the_earlier_default():
    plain = vars(config.parse_args([]))
    written = vars(config.parse_args(["--config", os.path.join(ROOT, "configs", "default.yaml")]))
    assert {k: v for k, v in written.items() if k != "config"} == {k: v for k, v in plain.items() if k != "config"}
    assert (plain["epochs"], plain["label_smoothing"], plain["hflip"], plain["infobatch"], plain["tta"],
            plain["amp"], plain["eval_interval"]) == (7, 0.1, 0.5, "auto", True, "auto", 0)
    ref = config.parse_args(["--config", os.path.join(ROOT, "configs", "reference_default.yaml")])
    assert (ref.epochs, ref.label_smoothing, ref.hflip, ref.infobatch, ref.tta, ref.amp, ref.eval_interval) == \
        (8, 0.0, 0.0, 0.0, False, False, 1)


@pytest.mark.parametrize("argv,distill,rate", [
    ([], False, config.AUTO_INFOBATCH),
    (["--mixup_alpha", "0.2"], False, 0.0), (["--cutmix_alpha", "1"], False, 0.0), (["--mosaic", "0.5"], False, 0.0),
    (["--adv", "fgsm"], False, 0.0), (["--balanced_sampler"], False, 0.0), ([], True, 0.0),
    (["--infobatch", "0.3"], False, 0.3), (["--infobatch", "0"], False, 0.0),
])
def test_infobatch_auto_prunes_only_where_every_loss_is_a_plain_samples_own(argv, distill, rate):
    assert _resolved(argv, distill).infobatch == rate


def test_an_explicit_infobatch_with_batch_mixing_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"--infobatch 0.5 does not combine with --mixup_alpha.*--infobatch 0 or auto"):
        _resolved(["--infobatch", "0.5", "--mixup_alpha", "0.2"])


@needs_fmnist
def test_a_run_with_the_defaults_prunes_evaluates_once_and_records_its_decisions(tmp_path):
    out = tmp_path / "run"
    train.main(config.parse_args(["--train_subset", "512", "--eval_subset", "256", "--model", "resnet8",
                                  "--batch_size", "64", "--epochs", "4", "--no_progress", "--device", "cpu",
                                  "--output_dir", str(out)]))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["infobatch"] == config.AUTO_INFOBATCH and saved["amp"] == "auto"  # the rate that trained
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()]
    col = {name: i for i, name in enumerate(rows[0])}
    assert [r[col["val_acc"]] != "" for r in rows[1:]] == [False, False, False, True]  # --eval_interval 0
    samples = [int(r[col["train_samples"]]) for r in rows[1:]]
    # epoch 1 has no losses to prune by; then ceil(0.875 x 4) = 4: no annealed tail at 4 epochs (nor at 7)
    assert samples[0] == 512 and all(s < 512 for s in samples[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] in ("bf16", "off") and 0 < summary["test_acc"] <= 1
    log = (out / "train.log").read_text()
    assert "amp auto:" in log and "hflip p=0.5" in log
