"""--amp auto: on CPU a short probe times the model in fp32 and bf16 autocast and keeps bf16 only when it is
clearly faster (mocked timings both ways, and the early stop of a slow bf16); no probe where oneDNN has no bf16;
on CUDA the GPU's compute capability decides; the probe leaves the run's weights, BatchNorm statistics and random
state alone; `--amp` / `--no_amp` still force; a resumed run keeps the decision it began with on the same
kind of processor and probes afresh on another; the flag, config files, ablate/tune commands and a train.py run."""
import json

import pytest
import torch
import yaml
from conftest import QUICK, ROOT, needs_fmnist

import config
from engine import precision
from engine.precision import choose_amp, make_precision, probe_speeds
from utils.errors import UserError

CPU = torch.device("cpu")


def tiny_model():
    """Convolution, BatchNorm and dropout: a forward pass moves BatchNorm statistics and draws random numbers."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 4))


class FakeSteps:
    """Stands in for precision._step_seconds: seconds per pass by dtype (a list: one value per call, the last
    repeating), recording each call's dtype and input."""

    def __init__(self, fp32, bf16):
        self.seconds = {None: fp32, torch.bfloat16: bf16}
        self.calls = []

    def __call__(self, model, x, dtype):
        self.calls.append((dtype, x))
        s = self.seconds[dtype]
        n = sum(d is dtype for d, _ in self.calls) - 1
        return s[min(n, len(s) - 1)] if isinstance(s, list) else s

    def count(self, dtype):
        return sum(d is dtype for d, _ in self.calls)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU whose oneDNN has bf16 kernels, whatever this one has."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)


@pytest.mark.parametrize("bf16_seconds, on", [(0.5, True), (0.9, True), (0.95, False), (1.0, False), (10.0, False)])
def test_probe_keeps_bf16_only_when_clearly_faster(monkeypatch, bf16_cpu, bf16_seconds, on):
    fake = FakeSteps(1.0, bf16_seconds)
    monkeypatch.setattr(precision, "_step_seconds", fake)
    prec, line = choose_amp(make_precision(CPU, "auto", "auto", True), tiny_model(), 3, 12, batch_size=16)
    assert (prec.enabled, prec.auto, prec.dtype) == (on, False, torch.bfloat16)
    assert prec.mode == ("bf16" if on else "off")
    assert prec.probe == {"fp32_images_per_second": 16.0, "bf16_images_per_second": pytest.approx(16 / bf16_seconds)}
    assert line == f"amp auto: bf16 {16 / bf16_seconds:.0f} img/s vs fp32 16 img/s -> bf16 {'on' if on else 'off'}"
    # the run's input: its channels and side, channels_last as asked, a probe batch
    x = fake.calls[0][1]
    assert x.shape == (16, 3, 12, 12) and x.is_contiguous(memory_format=torch.channels_last)
    assert prec.scaler().is_enabled() is False  # bf16 needs no loss scaling


def test_slow_bf16_stops_once_it_took_longer_than_fp32(monkeypatch):
    # fp32: a warm-up and 3 timed passes of 1 s = 4 s. bf16 10x slower: one pass (10 s) is past that -> stop
    fake = FakeSteps(1.0, 10.0)
    monkeypatch.setattr(precision, "_step_seconds", fake)
    fp32, bf16 = probe_speeds(tiny_model(), 3, 8, batch_size=4, steps=3)
    assert fake.count(None) == 4 and fake.count(torch.bfloat16) == 1
    assert (fp32, bf16) == (4.0, 0.4)  # bf16 from its only (warm-up) pass
    # 1.5x slower: 1.5, 3.0, 4.5 s -> stops after its third pass instead of four; speed from its timed passes
    fake = FakeSteps(1.0, 1.5)
    monkeypatch.setattr(precision, "_step_seconds", fake)
    fp32, bf16 = probe_speeds(tiny_model(), 3, 8, batch_size=3, steps=3)
    assert fake.count(torch.bfloat16) == 3 and bf16 == 2.0
    # as fast: all four passes, alternating with fp32's (both see the same load on a busy machine)
    fake = FakeSteps(1.0, 1.0)
    monkeypatch.setattr(precision, "_step_seconds", fake)
    probe_speeds(tiny_model(), 3, 8, batch_size=4, steps=3)
    assert [d for d, _ in fake.calls] == [None, torch.bfloat16] * 4


def test_warm_up_is_not_timed_and_short_steps_are_repeated(monkeypatch):
    # a slow first pass (oneDNN primitive creation) in both; 1/8 s steps repeated until 1 s of them is timed
    fake = FakeSteps([5.0, 0.125], [5.0, 0.0625])
    monkeypatch.setattr(precision, "_step_seconds", fake)
    fp32, bf16 = probe_speeds(tiny_model(), 3, 8, batch_size=4, steps=3, min_seconds=1.0)
    assert fake.count(None) == fake.count(torch.bfloat16) == 9  # warm-up + 8 timed
    assert (fp32, bf16) == (32.0, 64.0)


def test_no_probe_where_onednn_has_no_bf16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "_step_seconds", lambda *a: pytest.fail("probed a CPU without bf16"))
    gathered = []  # under torchrun the other ranks wait in this collective: it must be joined, probe or not
    monkeypatch.setattr(precision, "all_gather_object", lambda mine: gathered.append(mine) or [mine])
    prec, line = choose_amp(make_precision(CPU, "auto"), tiny_model(), 3, 8)
    assert not prec.enabled and prec.mode == "off" and prec.probe is None and gathered == [None]
    assert line == "amp auto: oneDNN has no bf16 kernels for this CPU -> bf16 off (fp32)"


@pytest.mark.parametrize("capability, on", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_decides_by_compute_capability_without_timing(monkeypatch, capability, on):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(precision, "_step_seconds", lambda *a: pytest.fail("timed on CUDA"))
    gpu = torch.device("cuda", 1)
    pending = make_precision(gpu, "auto")
    assert pending.mode == "auto" and not pending.enabled and asked == []
    prec, line = choose_amp(pending, torch.nn.Linear(2, 2), 3, 8)  # a CPU model: nothing runs on the GPU
    assert (prec.enabled, prec.dtype, prec.auto) == (on, torch.bfloat16, False) and asked == [gpu]
    assert prec.scaler().is_enabled() is False
    major, minor = capability
    assert line.startswith(f"amp auto: GPU compute capability {major}.{minor} ")
    assert line.endswith("-> bf16 on" if on else "-> amp off (pass --amp for fp16 with loss scaling)")


def test_every_rank_follows_rank_0s_measurement(monkeypatch, bf16_cpu):
    monkeypatch.setattr(precision, "_step_seconds", FakeSteps(1.0, 2.0))  # here bf16 is slower...
    monkeypatch.setattr(precision, "all_gather_object", lambda mine: [(10.0, 30.0), mine])  # ...on rank 0 faster
    prec, line = choose_amp(make_precision(CPU, "auto"), tiny_model(), 3, 8)
    assert prec.enabled and line == "amp auto: bf16 30 img/s vs fp32 10 img/s -> bf16 on"


def test_probe_leaves_weights_statistics_and_random_state_alone():
    """A real probe (both precisions run): the model's parameters and BatchNorm buffers, its mode, its gradients
    and the global random state are what they were, though the probe's copy trains and draws dropout masks."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fp32, bf16 = probe_speeds(model, 3, 8, batch_size=8, steps=1)
    assert fp32 > 0 and bf16 > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training and all(p.grad is None for p in model.parameters())
    # what the test guards against: the same passes on the model itself move all three
    model.train()
    model(torch.rand(8, 3, 8, 8)).mean().backward()
    assert not torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_explicit_amp_forces_and_no_amp_stays_off(monkeypatch, bf16_cpu):
    monkeypatch.setattr(precision, "_step_seconds", lambda *a: pytest.fail("probed a forced setting"))
    for amp in (True, False):
        prec = make_precision(CPU, amp, "auto", True)
        assert choose_amp(prec, tiny_model(), 3, 8) == (prec, None)
        assert prec.enabled is amp and prec.mode == ("bf16" if amp else "off")
    with pytest.raises(UserError, match="--amp auto chooses between bf16 and fp32"):
        make_precision(CPU, "auto", "fp16")


def test_flag_takes_on_off_and_auto(tmp_path, capsys):
    parse = config.parse_args
    assert (parse([]).amp, parse(["--amp"]).amp, parse(["--no_amp"]).amp, parse(["--amp", "auto"]).amp) == \
        ("auto", True, False, "auto")  # auto is the default
    assert parse(["--amp=auto"]).amp == "auto" and parse(["--amp", "auto", "--no_amp"]).amp is False
    assert parse(["--amp", "--ema"]).amp is True  # a bare --amp before another flag takes no value
    for argv in (["--amp", "fast"], ["--no_amp", "auto"], ["--amp", "true"]):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "is not a value it takes (give --amp, --amp auto or --no_amp)" in capsys.readouterr().err
    help_text = config.get_parser().format_help()
    assert "--amp [auto], --no_amp" in help_text and "--no_amp [auto]" not in help_text

    for value, expected in (("auto", "auto"), ("true", True), ("false", False)):
        path = tmp_path / f"{value}.yaml"
        path.write_text(f"amp: {value}\n")
        assert parse(["--config", str(path)]).amp == expected
        assert parse(["--config", str(path), "--no_amp"]).amp is False
    path = tmp_path / "bad.yaml"
    path.write_text("amp: sometimes\n")
    with pytest.raises(UserError, match="amp: 'sometimes' is not true, false or auto"):
        parse(["--config", str(path)])
    path.write_text("ema: auto\n")  # the third value is --amp's alone
    with pytest.raises(UserError, match="ema: 'auto' is not true or false"):
        parse(["--config", str(path)])
    saved = tmp_path / "saved.yaml"  # a run's config.yaml keeps auto, so a rerun probes again
    config.save_config(parse(["--amp", "auto"]), saved)
    assert yaml.safe_load(saved.read_text())["amp"] == "auto" and parse(["--config", str(saved)]).amp == "auto"
    assert parse(["--config", f"{ROOT}/configs/best.yaml"]).amp == "auto"  # the recipe probes


def test_ablate_and_tune_pass_auto_as_a_value():
    import ablate
    import tune
    tokens, _ = ablate.cli_tokens(config.get_parser(), {"amp": "auto", "ema": True, "acb": False})
    assert tokens == ["--amp", "auto", "--ema", "--no_acb"]
    assert config.parse_args(tokens).amp == "auto"
    space = {"amp": {"type": "bool", "choices": [True, False, "auto"]}}
    assert [tune.to_argv({"amp": v}, space) for v in (True, False, "auto")] == [
        ["--amp"], ["--no_amp"], ["--amp", "auto"]]
    action = {a.dest: a for a in config.get_parser()._actions}["amp"]
    assert tune._check("space", "amp", action, "auto") == "bool"
    with pytest.raises(UserError, match="'maybe' is not true, false or auto"):
        tune._check("space", "amp", action, "maybe")


@needs_fmnist
def test_train_with_amp_auto_logs_the_decision_and_trains_in_it(tmp_path, monkeypatch, bf16_cpu):
    import train
    monkeypatch.setattr(precision, "_step_seconds", FakeSteps(1.0, 0.5))  # bf16 twice as fast
    seen = []
    orig_epoch = train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: seen.append(a[6]) or orig_epoch(*a, **k))
    out = tmp_path / "run"
    train.main(config.parse_args([*QUICK, "--amp", "auto", "--output_dir", str(out)]))
    log = (out / "train.log").read_text()
    assert "| amp auto |" in log  # undecided when the device line is written
    assert "amp auto: bf16 128 img/s vs fp32 64 img/s -> bf16 on" in log  # the probe batch is QUICK's 64
    assert [(p.enabled, p.dtype, p.auto) for p in seen] == [(True, torch.bfloat16, False)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] == "bf16"
    assert summary["amp_probe"] == {"fp32_images_per_second": 64.0, "bf16_images_per_second": 128.0}
    assert yaml.safe_load((out / "config.yaml").read_text())["amp"] == "auto"


def test_recorded_decision_is_kept_only_from_the_same_kind_of_processor():
    here = precision.hardware_name(CPU)
    assert precision.recorded_mode({"mode": "bf16", "hardware": here}, CPU) == "bf16"
    assert precision.recorded_mode({"mode": "off", "hardware": here}, CPU) == "off"
    for record in (None, "bf16", {"mode": "bf16"}, {"mode": "bf16", "hardware": here + " (another)"},
                   {"mode": "fp16", "hardware": here}, {"mode": ["bf16"], "hardware": here}, 7):
        assert precision.recorded_mode(record, CPU) is None, record
    prec, line = choose_amp(make_precision(CPU, "auto"), tiny_model(), 3, 8, recorded="off")
    assert (prec.enabled, prec.auto, prec.mode) == (False, False, "off") and "as decided when the run began" in line
    forced = make_precision(CPU, True)  # an explicit --amp is not overridden by a record
    assert choose_amp(forced, tiny_model(), 3, 8, recorded="off")[0] is forced


@needs_fmnist
def test_a_resumed_run_keeps_the_precision_it_began_in(tmp_path, monkeypatch, bf16_cpu):
    import train
    monkeypatch.setattr(precision, "_step_seconds", FakeSteps(1.0, 0.5))  # the first part: bf16 twice as fast
    first = tmp_path / "first"
    train.main(config.parse_args([*QUICK, "--amp", "auto", "--output_dir", str(first)]))
    ckpt = torch.load(first / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["amp"] == {"mode": "bf16", "hardware": precision.hardware_name(CPU)}

    # resumed on a machine that is now busy: a probe would say fp32, but the run goes on in bf16, unprobed
    monkeypatch.setattr(precision, "_step_seconds", lambda *a: pytest.fail("probed a resumed run"))
    seen = []
    orig_epoch = train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: seen.append(a[6]) or orig_epoch(*a, **k))
    resumed = tmp_path / "resumed"
    train.main(config.parse_args([*QUICK, "--amp", "auto", "--epochs", "2", "--resume", str(first / "last.pt"),
                                  "--output_dir", str(resumed)]))
    assert [(p.enabled, p.dtype) for p in seen] == [(True, torch.bfloat16)]
    assert "amp auto: bf16, as decided when the run began" in (resumed / "train.log").read_text()
    assert json.loads((resumed / "summary.json").read_text())["amp"] == "bf16"

    # moved to another kind of processor: the probe decides afresh (here bf16 is slower -> off)
    ckpt["amp"]["hardware"] = "another CPU (AVX2)"
    torch.save(ckpt, tmp_path / "moved.pt")
    monkeypatch.setattr(precision, "_step_seconds", FakeSteps(1.0, 10.0))
    seen.clear()
    moved = tmp_path / "moved"
    train.main(config.parse_args([*QUICK, "--amp", "auto", "--epochs", "2", "--resume", str(tmp_path / "moved.pt"),
                                  "--output_dir", str(moved)]))
    assert [(p.enabled, p.auto) for p in seen] == [(False, False)]
    assert "-> bf16 off" in (moved / "train.log").read_text()
