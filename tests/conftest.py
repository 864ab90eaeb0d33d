import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"

# The default recipe's tricks switched off (as configs/reference_default.yaml has them): a test turns on only the
# trick it tests; tests/test_default_recipe.py tests the defaults themselves.
PLAIN = ["--label_smoothing", "0", "--hflip", "0", "--infobatch", "0", "--no_tta", "--no_amp", "--eval_interval", "1"]
# A run small enough for a unit test: a few hundred real Fashion-MNIST images, ResNet-8, CPU.
QUICK = ["--train_subset", "512", "--eval_subset", "256", "--model", "resnet8", "--epochs", "1",
         "--batch_size", "64", "--no_progress", "--device", "cpu", "--warmup_epochs", "0", *PLAIN]



def drop(flags, *names):
    """`flags` without the flags `names` and the value after each (QUICK less --epochs, say)."""
    out, i = [], 0
    while i < len(flags):
        if flags[i] in names:
            i += 2
            continue
        out.append(flags[i])
        i += 1
    return out


needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST), reason="Fashion-MNIST not installed (bash setup.sh)")


def run_script(args, cwd=ROOT, timeout=600):
    """Run a repository script in a fresh interpreter; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def cli_error(main, argv, capsys, parser=None):
    """Run `python script.py ARGV` in this interpreter (script = `main` wrapped as its __main__ does: flags parsed,
    then run_cli) and return its error line; asserts exit code 2 and that the error is the last line of stderr.
    An exception other than UserError propagates and fails the test, as a traceback would in the script."""
    import config
    from utils.errors import run_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(config.parse_args(argv, parser=parser)))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err and err[-1].startswith("error:"), (exc.value.code, err[-5:])
    return err[-1]


@pytest.fixture(autouse=True)
def restore_logging():
    """train.main and ablate.main install their own root log handlers; give pytest's back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
