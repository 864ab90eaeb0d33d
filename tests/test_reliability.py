"""Bad input ends in one `error: ...` line (exit 2) or the behaviour a user expects, and nothing already written
is lost: flag ranges, typed config files, short argument errors, where resumed and evaluated runs write,
leftover temporary files, a full disk, checkpoints used where they do not fit."""
import errno
import json
import math
import os
import shutil

import pytest
import torch
import yaml
from conftest import QUICK, cli_error, drop, needs_fmnist

import config
import train
from engine.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.outputs import eval_dir, open_dir, write_json


def _outside(spec):
    """A value just outside a RANGES entry (below its low end, else above its high end)."""
    low, high, *how = spec
    if low > -math.inf:
        return low if how and how[0] in ("open", "open-low") else low - 1
    return high + 1


@pytest.mark.parametrize("name", sorted(config.RANGES))
def test_every_ranged_flag_refuses_a_value_outside_its_range(name, capsys):
    action = next(a for a in config.get_parser()._actions if a.dest == name)
    value = _outside(config.RANGES[name])
    value = int(value) if action.type is int else float(value)
    n = action.nargs if isinstance(action.nargs, int) else 1
    line = cli_error(train.main, [f"--{name}", *[str(value)] * n], capsys)
    assert line.startswith(f"error: --{name} ") and "must be in" in line


def test_every_numeric_flag_has_a_range():
    numeric = {a.dest for a in config.get_parser()._actions if a.type in (int, float)}
    assert numeric - set(config.RANGES) <= {"in_chans"}  # in_chans has choices


@pytest.mark.parametrize("flag", ["--lr", "--time_budget", "--ema_decay", "--label_smoothing"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused(flag, value, capsys):
    line = cli_error(train.main, [f"{flag}={value}"], capsys)  # --lr=-inf: argparse reads -inf as a flag
    assert line.startswith(f"error: {flag} ") and ("finite" in line or "must be in" in line)


def test_the_examples_from_the_field(capsys):
    assert "--ema_decay 1.5: must be in (0, 1)" in cli_error(train.main, ["--ema", "--ema_decay", "1.5"], capsys)
    assert "--label_smoothing 1.5" in cli_error(train.main, ["--label_smoothing", "1.5"], capsys)
    assert "--time_budget nan: must be a finite number" in cli_error(train.main, ["--time_budget", "nan"], capsys)


def test_an_invalid_value_is_one_line_with_a_hint(capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse_args(["--batch_size", "many"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: argument --batch_size: invalid int value") and err[0].endswith("see --help")


@pytest.mark.parametrize("text, key, expected", [
    ("batch_size: [1, 2]\n", "batch_size", "an integer"),
    ("batch_size: 1.5\n", "batch_size", "an integer"),
    ("batch_size: true\n", "batch_size", "an integer"),
    ("lr: null\n", "lr", "a number"),
    ("lr: fast\n", "lr", "a number"),
    ("milestones: 30\n", "milestones", "a list"),
    ("ema: 1\n", "ema", "true or false"),
    ("scheduler: {a: 1}\n", "scheduler", "a string"),
    ("attention: xyz\n", "attention", "one of none, se"),
    ("cutout: [1, 2, 3]\n", "cutout", "a list of 2"),
    ("1: 2\n", "1", "unknown key"),
])
def test_config_values_are_typed_like_the_command_line(tmp_path, text, key, expected, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = cli_error(train.main, ["--config", str(path)], capsys)
    assert key in line and expected in line, line


def test_config_nulls_and_numbers_that_fit_are_taken(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nimg_size: null\ncutout: [1, 8]\nema: false\nmilestones: [2, 4.5]\n")
    args = config.parse_args(["--config", str(path)])
    assert args.lr == 1.0 and isinstance(args.lr, float) and args.img_size is None and args.cutout == [1, 8]
    assert args.milestones == [2.0, 4.5] and args.ema is False


def test_a_saved_config_yaml_reads_back(tmp_path):
    args = config.parse_args(["--ema", "--cutout", "1", "8"])
    config.save_config(args, tmp_path / "config.yaml")
    again = config.parse_args(["--config", str(tmp_path / "config.yaml")])
    assert {k: v for k, v in vars(again).items() if k != "config"} == \
        {k: v for k, v in vars(args).items() if k != "config"}


@needs_fmnist
def test_resuming_a_copied_run_writes_into_the_copy(tmp_path):
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    train.main(config.parse_args([*QUICK, "--output_dir", str(orig)]))
    shutil.copytree(orig, copy)
    before = {p: (orig / p).read_bytes() for p in ("last.pt", "metrics.csv", "summary.json")}
    train.main(config.parse_args(["--resume", str(copy / "last.pt"), "--epochs", "2"]))
    assert {p: (orig / p).read_bytes() for p in before} == before  # the original run is untouched
    assert json.loads((copy / "summary.json").read_text())["epochs"] == 2

    # --eval_only writes into a fresh eval*/ folder each time, never over the run's own files
    report = (copy / "eval_report.md").read_bytes()
    for want in ("eval", "eval2"):
        train.main(config.parse_args(["--eval_only", "--ckpt", str(copy / "last.pt"), *QUICK[:4], "--no_tta",
                                      "--no_amp", "--no_progress", "--device", "cpu"]))
        assert (copy / want / "eval_summary.json").exists()
    assert (copy / "eval_report.md").read_bytes() == report
    with pytest.raises(UserError, match="already holds summary.json .* --overwrite"):
        eval_dir(str(copy / "last.pt"), str(copy))


@needs_fmnist
def test_outputs_of_the_repository_used_where_they_do_not_fit(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(config.parse_args([*QUICK, "--output_dir", str(out)]))
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    averaged = {k: ckpt[k] for k in ("model", "model_config", "class_names", "args")}  # like swa.pt / averaged
    torch.save(averaged, tmp_path / "avg.pt")
    line = cli_error(train.main, ["--resume", str(tmp_path / "avg.pt")], capsys)
    assert "is not a train.py last.pt" in line and "--eval_only --ckpt" in line
    broken = {**ckpt, "optimizer": "oops"}
    torch.save(broken, tmp_path / "broken.pt")
    assert "has no optimizer state" in cli_error(train.main, ["--resume", str(tmp_path / "broken.pt")], capsys)


def test_stale_temporary_files_are_removed_when_a_run_opens_its_folder(tmp_path):
    (tmp_path / "last.pt.tmp12345").write_bytes(b"half a checkpoint")
    (tmp_path / "metrics.csv.tmp999").write_text("half")
    (tmp_path / "keep.txt").write_text("mine")
    open_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_a_full_disk_is_one_line_and_the_old_file_survives(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "epoch": 1}, str(path))
    write_json(str(tmp_path / "summary.json"), {"acc": 0.5})

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last.pt \(No space left on device\)"):
        save_checkpoint({"model": {}, "epoch": 2}, str(path))
    assert torch.load(path, weights_only=True)["epoch"] == 1

    def failing_dump(obj, f, **_k):
        f.write('{"acc": 0.')
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(json, "dump", failing_dump)
    with pytest.raises(UserError, match=r"cannot write .*summary.json \(No space left on device\)"):
        write_json(str(tmp_path / "summary.json"), {"acc": 0.9})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"acc": 0.5}
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_config_yaml_of_every_recipe_is_valid():
    for name in ("default", "default_5min", "best", "best_resnet20"):
        cfg = yaml.safe_load(open(os.path.join(os.path.dirname(config.__file__), "configs", f"{name}.yaml")))
        assert isinstance(cfg, dict)
        config.parse_args(["--config", os.path.join(os.path.dirname(config.__file__), "configs", f"{name}.yaml")])


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from datasets.files import load_image
    grey = np.full((6, 6), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    grey[0, 0], grey[0, 1] = 0, 65535
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    for chans in (1, 3):
        x = load_image(str(path), chans, 6)
        assert x.shape == (chans, 6, 6) and x.dtype == torch.uint8
        assert x[0, 2, 2] == round(32768 / 257) and x[0, 0, 0] == 0 and x[0, 0, 1] == 255


def test_image_column_equal_to_label_column_is_refused(tmp_path):
    from datasets.files import read_info_csv
    (tmp_path / "l.csv").write_text("image,label\na.png,cat\n")
    with pytest.raises(UserError, match="--image_column and --label_column are both 'image'"):
        read_info_csv(str(tmp_path / "l.csv"), "image", "image")


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path, caplog):
    from PIL import Image

    from datasets.files import read_imagefolder
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
    (tmp_path / "bird").mkdir()
    for cls in ("cat", "dog"):
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "a.png")
    with caplog.at_level("WARNING"):
        paths, names = read_imagefolder(str(tmp_path))["train"]
    assert sorted(set(names)) == ["cat", "dog"]
    assert "bird" in caplog.text and "without images" in caplog.text


@needs_fmnist
def test_one_epoch_with_the_default_warmup_trains(tmp_path, capsys):
    quick = drop(QUICK, "--warmup_epochs")
    assert "--epochs" in quick and config.parse_args([]).warmup_epochs == 1.0
    summary = train.main(config.parse_args([*quick, "--output_dir", str(tmp_path / "run")]))
    assert summary["epochs"] == 1 and "warming up for 0.5 instead" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["warmup_epochs"] == 0.5  # reproducible


def test_predict_out_naming_a_folder_is_refused_before_inference(tmp_path, capsys):
    import predict
    from utils.errors import run_cli
    with pytest.raises(SystemExit) as exc:
        run_cli(predict.main, ["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "is a folder; name the CSV file" in err[0]


@needs_fmnist
def test_tta_shift_beyond_the_image_is_refused(capsys):
    line = cli_error(train.main, [*QUICK, "--tta", "--tta_shift", "28"], capsys)
    assert "--tta_shift 28 moves a 28-pixel image out of view" in line


@needs_fmnist
def test_hand_edited_training_state_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(config.parse_args([*QUICK, "--output_dir", str(out)]))
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    for i, damage in enumerate(({"epoch": "1"}, {"metrics": {"history": None}}, {"rng": None},
                                {"best_val_acc": "high"})):
        torch.save({**ckpt, **damage}, tmp_path / f"bad{i}.pt")
        line = cli_error(train.main, ["--resume", str(tmp_path / f"bad{i}.pt")], capsys)
        assert "damaged training state" in line, (damage, line)
    no_args = {k: v for k, v in ckpt.items() if k != "args"}
    torch.save(no_args, tmp_path / "noargs.pt")  # flags come from the command line then: still resumes
    train.main(config.parse_args([*QUICK, "--resume", str(tmp_path / "noargs.pt"), "--epochs", "2",
                                  "--output_dir", str(tmp_path / "again")]))
