"""reparam_export.py in-process: a tiny checkpoint is fused and exported (deploy.pt, ONNX, TorchScript) with
outputs that match the trained model; a forced mismatch writes nothing; bad input is a UserError (exit 2)."""
import os
import warnings

import pytest
import torch
from conftest import needs_fmnist
from torch import nn

import models
import reparam_export
from engine.checkpoint import load_model
from models.repvgg import RepVGG
from utils.errors import UserError, run_cli

MEAN, STD = (0.3,), (0.35,)


def randomize_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


@pytest.fixture
def tiny_repvgg(monkeypatch):
    """A two-blocks-per-net RepVGG registered for this test only (the real family is tested elsewhere)."""
    def repvgg_tiny(num_classes, in_chans, img_size, attn_layer=None, drop_path_rate=0.0):
        return RepVGG((1, 1, 1, 1), (0.5, 0.5), num_classes, in_chans, img_size)
    monkeypatch.setitem(models.MODELS, "repvgg_tiny", repvgg_tiny)
    return "repvgg_tiny"


def write_ckpt(path, name, acb=False, data_args=None, ema_seed=None):
    """A checkpoint as train.py writes it, with random BN statistics so that fusion is not trivial."""
    torch.manual_seed(0)
    model = randomize_bn(models.build_model(name, 10, 1, 28, MEAN, STD, acb=acb))
    ckpt = {"model": model.state_dict(), "model_config": models.model_config(name, 10, 1, 28, MEAN, STD, acb=acb),
            "class_names": [f"c{i}" for i in range(10)], "ema": None,
            # Data that does not exist unless a test asks for real data: the script must cope.
            "args": data_args or {"dataset": "imagefolder", "data_dir": os.path.join(os.path.dirname(path), "no")}}
    if ema_seed is not None:
        ema = randomize_bn(models.build_model(name, 10, 1, 28, MEAN, STD, acb=acb), seed=ema_seed)
        ckpt["ema"] = {"module": ema.state_dict()}
    torch.save(ckpt, path)
    return ckpt


def trained_outputs(ckpt, x, use_ema=False):
    model, _ = load_model(ckpt, use_ema=use_ema)
    with torch.no_grad():
        return model.eval()(x)


def test_export_acb_resnet8_writes_checked_deploy_and_onnx(tmp_path, capsys):
    ckpt = write_ckpt(str(tmp_path / "best.pt"), "resnet8", acb=True)
    out, onnx_path = str(tmp_path / "deploy.pt"), str(tmp_path / "deploy.onnx")
    rc = reparam_export.main(["--ckpt", str(tmp_path / "best.pt"), "--out", out, "--onnx", onnx_path,
                              "--check_batch", "4", "--latency_runs", "0"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "real data unavailable" in stdout and "MFLOPs / image" in stdout
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "deploy.onnx", "deploy.pt"]

    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))  # another batch size than checked
    expected = trained_outputs(ckpt, x)
    deploy, deploy_ckpt = load_model(out)  # model_from_config builds the fused form from reparameterized=True
    assert deploy_ckpt["model_config"] == {**ckpt["model_config"], "reparameterized": True}
    assert deploy_ckpt["class_names"] == ckpt["class_names"] and deploy_ckpt["args"] == ckpt["args"]
    assert not any(".bn_kxk." in k or ".conv_1xk." in k for k in deploy_ckpt["model"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.net.layer1.modules())
    with torch.no_grad():
        torch.testing.assert_close(deploy.eval()(x), expected, rtol=1e-4, atol=1e-4)

    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected,
                               rtol=1e-4, atol=1e-4)


@needs_fmnist
def test_export_repvgg_ema_weights_checked_on_real_data(tmp_path, capsys, tiny_repvgg):
    data_args = {"dataset": "fashion_mnist", "train_subset": 200, "eval_subset": 100, "batch_size": 50}
    ckpt = write_ckpt(str(tmp_path / "best.pt"), tiny_repvgg, data_args=data_args, ema_seed=7)
    out = str(tmp_path / "deploy.pt")
    ts_path = str(tmp_path / "deploy.ts")
    rc = reparam_export.main(["--ckpt", str(tmp_path / "best.pt"), "--out", out, "--use_ema", "--torchscript",
                              ts_path, "--check_batch", "8", "--latency_runs", "1"])
    stdout = capsys.readouterr().out
    assert rc == 0
    for line in ("re-parameterised vs trained, real batch", "torchscript vs trained, real batch",
                 "CPU ms, batch 64"):
        assert line in stdout
    x = torch.rand(2, 1, 28, 28)
    expected = trained_outputs(ckpt, x, use_ema=True)
    deploy, _ = load_model(out)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    with torch.no_grad():
        got = deploy.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        torch.testing.assert_close(torch.jit.load(ts_path)(x), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, trained_outputs(ckpt, x), rtol=1e-3, atol=1e-3)  # not the raw weights


def test_export_refuses_to_write_on_mismatch(tmp_path, capsys, monkeypatch, tiny_repvgg):
    write_ckpt(str(tmp_path / "best.pt"), tiny_repvgg)
    real = reparam_export.reparameterize_model

    def corrupting(model):
        real(model)
        with torch.no_grad():
            model.net.stage2[0].conv.bias.add_(0.5)
        return model
    monkeypatch.setattr(reparam_export, "reparameterize_model", corrupting)
    rc = reparam_export.main(["--ckpt", str(tmp_path / "best.pt"), "--out", str(tmp_path / "deploy.pt"),
                              "--onnx", str(tmp_path / "deploy.onnx"), "--torchscript", str(tmp_path / "d.ts"),
                              "--latency_runs", "0"])
    assert rc == 1
    assert "nothing written" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["best.pt"]


def test_export_refuses_when_onnx_disagrees(tmp_path, capsys, monkeypatch, tiny_repvgg):
    # The ONNX check is a real check: a wrong onnxruntime answer stops the export before anything is written.
    ort = pytest.importorskip("onnxruntime")
    write_ckpt(str(tmp_path / "best.pt"), tiny_repvgg)

    class WrongSession(ort.InferenceSession):
        def run(self, *a, **kw):
            return [y + 1e-2 for y in super().run(*a, **kw)]
    monkeypatch.setattr(ort, "InferenceSession", WrongSession)
    rc = reparam_export.main(["--ckpt", str(tmp_path / "best.pt"), "--out", str(tmp_path / "deploy.pt"),
                              "--onnx", str(tmp_path / "deploy.onnx"), "--latency_runs", "0"])
    assert rc == 1
    assert "onnxruntime vs trained" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["best.pt"]


def test_export_of_a_model_with_nothing_to_fuse(tmp_path, capsys):
    ckpt = write_ckpt(str(tmp_path / "best.pt"), "resnet8")
    out = str(tmp_path / "deploy.pt")
    assert reparam_export.main(["--ckpt", str(tmp_path / "best.pt"), "--out", out, "--latency_runs", "0"]) == 0
    assert "nothing to re-parameterise in resnet8; the deploy checkpoint equals the trained one" in \
        capsys.readouterr().out
    deploy = torch.load(out, weights_only=True)
    assert deploy["model"].keys() == ckpt["model"].keys()
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(deploy["model"][k], v, rtol=0, atol=0)


def test_bad_input_is_a_user_error(tmp_path, capsys):
    ckpt = str(tmp_path / "best.pt")
    with pytest.raises(SystemExit) as exit_info:  # missing file, through the script's run_cli
        run_cli(reparam_export.main, ["--ckpt", ckpt, "--out", str(tmp_path / "deploy.pt")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint {ckpt} does not exist")
    with open(ckpt, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        reparam_export.main(["--ckpt", ckpt, "--out", str(tmp_path / "deploy.pt")])
    with pytest.raises(UserError, match="equals --ckpt"):
        reparam_export.main(["--ckpt", ckpt, "--out", ckpt])
    write_ckpt(ckpt, "resnet8")
    with pytest.raises(UserError, match="no EMA weights"):
        reparam_export.main(["--ckpt", ckpt, "--out", str(tmp_path / "deploy.pt"), "--use_ema"])
    assert os.listdir(tmp_path) == ["best.pt"]


def test_train_eval_only_on_the_deploy_checkpoint_gives_the_same_metrics(tmp_path, restore_logging):
    import config
    import train
    data_args = {"dataset": "fashion_mnist", "train_subset": 200, "eval_subset": 200}
    write_ckpt(str(tmp_path / "best.pt"), "resnet8", acb=True, data_args=data_args)
    assert reparam_export.main(["--ckpt", str(tmp_path / "best.pt"), "--out", str(tmp_path / "deploy.pt"),
                                "--latency_runs", "0"]) == 0
    summaries = []
    for name in ("best", "deploy"):
        args = config.parse_args(["--eval_only", "--ckpt", str(tmp_path / f"{name}.pt"), "--train_subset", "200",
                                  "--eval_subset", "200", "--no_amp", "--device", "cpu", "--no_progress",
                                  "--output_dir", str(tmp_path / f"eval_{name}")])
        summaries.append(train.main(args))
    trained, deployed = summaries
    assert deployed["val_acc"] == trained["val_acc"]
    assert deployed["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-5)


def test_help_lists_only_its_flags():
    from conftest import run_script
    res = run_script(["reparam_export.py", "--help"])
    assert res.returncode == 0 and len(res.stdout.splitlines()) <= 80, res.stdout
    assert "--onnx" in res.stdout and "--no_use_ema" in res.stdout and "--data_dir" not in res.stdout
    res = run_script(["reparam_export.py", "--ckpt", "a.pt", "--out", "b.pt", "--opset", "x"])
    assert res.returncode == 2 and res.stderr.startswith("error: argument --opset") \
        and len(res.stderr.splitlines()) == 1, res.stderr
