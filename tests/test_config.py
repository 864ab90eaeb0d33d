import json

import pytest
import yaml

import config
from utils.errors import UserError


def test_defaults_file_and_cli_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.05\nbatch_size: 32\nmodel: resnet32\n")
    args = config.parse_args(["--config", str(cfg), "--lr", "0.3"])
    assert args.lr == 0.3            # command line beats the file
    assert args.batch_size == 32     # file beats the default
    assert args.model == "resnet32"
    assert args.epochs == config.get_parser().get_default("epochs")  # default where nobody says


def test_json_config(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 3, "hflip": 0.5}))
    args = config.parse_args(["--config", str(cfg)])
    assert (args.epochs, args.hflip) == (3, 0.5)


def test_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(UserError, match="learning_rate"):
        config.parse_args(["--config", str(cfg)])


def test_bad_syntax_and_missing_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: [0.1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.parse_args(["--config", str(cfg)])
    with pytest.raises(UserError, match="does not exist"):
        config.parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_saved_config_round_trips(tmp_path):
    args = config.parse_args(["--lr", "0.07", "--hflip", "0.5", "--color_jitter", "0.1", "0.2", "0", "0",
                              "--output_dir", str(tmp_path / "run")])
    path = tmp_path / "config.yaml"
    config.save_config(args, path)
    again = config.parse_args(["--config", str(path)])
    a, b = vars(args), vars(again)
    for k in a:
        if k not in ("config", "output_dir"):
            assert a[k] == b[k], k
    assert "output_dir" not in yaml.safe_load(path.read_text())  # a reproduction gets its own dir


def test_every_flag_has_help_default_shown():
    text = config.get_parser().format_help()
    assert "(default: 0.2)" in text  # ArgumentDefaultsHelpFormatter shows defaults


def test_one_flag_convention():
    """Underscores only; every boolean is --x / --no_x; no store_true/BooleanOptionalAction (config.py docstring)."""
    import argparse
    parser = config.get_parser()
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt == "-h" or (opt.startswith("--") and "-" not in opt[2:]), opt
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            raise AssertionError(f"{action.dest}: use config.BoolFlag")
        if isinstance(action, config.BoolFlag):
            assert action.option_strings == [f"--{action.dest}", f"--no_{action.dest}"]
    args = config.parse_args(["--no_amp", "--ema", "--no_bias_decay", "--no_progress"])
    assert (args.amp, args.ema, args.bias_decay, args.progress) == (False, True, False, False)
    assert config.parse_args(["--amp", "--no_amp"]).amp is False  # the last one wins, as on any command line


def test_older_boolean_keys_still_read(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("no_bias_decay: true\nno_progress: false\n")
    args = config.parse_args(["--config", str(path)])
    assert args.bias_decay is False and args.progress is True


def test_every_script_uses_the_one_boolean_flag():
    """No parser in the repository spells a boolean another way (store_true, BooleanOptionalAction's --no-x)."""
    import pathlib
    root = pathlib.Path(config.__file__).resolve().parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if "tests" not in p.parts and "runs" not in
                 p.parts and ('action="store_true"' in p.read_text() or "=argparse.BooleanOptionalAction" in
                              p.read_text())]
    assert not offenders, offenders
