"""train_distill.py: the teacher is frozen (unchanged, no gradient) and a class-count mismatch is refused."""
import json

import torch
from conftest import QUICK, cli_error, needs_fmnist, run_script

import config
import train_distill
from engine.checkpoint import save_checkpoint
from models import build_model, model_config

pytestmark = needs_fmnist


def _teacher_ckpt(path, num_classes=10):
    mcfg = model_config("resnet8", num_classes, 1, 28, (0.286,), (0.353,), "none", 0.0, False)
    model = build_model(**{k: v for k, v in mcfg.items() if k != "reparameterized"})
    save_checkpoint({"model": model.state_dict(), "model_config": mcfg,
                     "class_names": [str(i) for i in range(num_classes)],
                     "args": {}}, path)
    return model


def test_teacher_is_frozen_and_summary_has_its_accuracy(tmp_path, monkeypatch):
    teacher_path = tmp_path / "teacher.pt"
    teacher = _teacher_ckpt(teacher_path)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {}
    orig = train_distill.build_teacher_loss

    def spy(args, data, prec, criterion):
        loss, t, extra = orig(args, data, prec, criterion)
        seen["teacher"] = t
        return loss, t, extra

    monkeypatch.setattr(train_distill, "build_teacher_loss", spy)
    args = config.parse_args([*QUICK, "--teacher_ckpt", str(teacher_path), "--model", "mlp_student",
                              "--kd_temperature", "4", "--kd_alpha", "0.5", "--output_dir", str(tmp_path / "run")],
                             parser=train_distill.get_parser())
    summary = train_distill.main(args)
    t = seen["teacher"].model  # unwrap the resize adaptor
    for k, v in t.state_dict().items():
        assert torch.equal(v.cpu(), before[k]), k  # BN statistics too: the teacher ran in eval mode
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert not t.training
    assert 0.0 <= summary["teacher_val_acc"] <= 1.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["teacher_val_acc"] == summary["teacher_val_acc"]


def test_teacher_with_other_class_count_is_refused(tmp_path, capsys):
    teacher_path = tmp_path / "teacher5.pt"
    _teacher_ckpt(teacher_path, num_classes=5)
    last = cli_error(train_distill.main, [*QUICK, "--teacher_ckpt", str(teacher_path), "--output_dir",
                                          str(tmp_path / "r")], capsys, parser=train_distill.get_parser())
    assert "5 classes but the data has 10" in last
    assert not (tmp_path / "r" / "last.pt").exists()


def test_missing_teacher_flag_in_a_fresh_interpreter(tmp_path):
    r = run_script(["train_distill.py", *QUICK, "--output_dir", str(tmp_path / "r")])
    assert r.returncode == 2 and "--teacher_ckpt" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_teacher_use_ema_loads_the_ema_weights(tmp_path, monkeypatch):
    teacher_path = tmp_path / "teacher.pt"
    model = _teacher_ckpt(teacher_path)
    ckpt = torch.load(teacher_path, map_location="cpu", weights_only=True)
    ema_state = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt["ema"] = {"module": ema_state, "num_updates": 1}
    save_checkpoint(ckpt, teacher_path)
    seen = {}
    orig = train_distill.build_teacher_loss

    def spy(args, data, prec, criterion):
        loss, t, extra = orig(args, data, prec, criterion)
        seen["teacher"] = t.model
        return loss, t, extra

    monkeypatch.setattr(train_distill, "build_teacher_loss", spy)
    args = config.parse_args([*QUICK, "--teacher_ckpt", str(teacher_path), "--teacher_use_ema", "--model",
                              "mlp_student", "--output_dir", str(tmp_path / "run")], parser=train_distill.get_parser())
    train_distill.main(args)
    for k, v in seen["teacher"].state_dict().items():
        assert torch.equal(v.cpu(), ema_state[k]), k
