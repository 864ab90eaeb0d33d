"""Fine-tuning: --pretrained loads exactly the weights it names (torchvision's cache, a timm or torchvision state
dict, a checkpoint of this repository), adapting a 1-channel stem and re-initialising a head of another class
count; --freeze_epochs, --layer_decay, --head_lr_scale and --accum_steps against independent computations."""
import os
import urllib.error

import pytest
import torch
import torchvision
from conftest import PLAIN, QUICK, cli_error, needs_fmnist

import config
import train
from engine.optim import OptimizerOptions, build_optimizer
from engine.precision import make_precision
from models import build_model
from models.pretrained import IMAGENET_MEAN, IMAGENET_STD, fetch_weights, load_pretrained, stats_for
from tricks.freeze import FreezeBackbone
from utils.errors import UserError


def _cache_resnet18(torch_home):
    """A torchvision-format resnet18 state dict (1000 classes) where torchvision's cache looks for it."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_pretrained_loads_torchvisions_cached_weights_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _cache_resnet18(tmp_path)
    weights = fetch_weights("resnet18", "default")
    assert weights.stem == "standard" and weights.stats == (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = stats_for(weights.stats, 1)
    model = build_model("resnet18", 10, 1, 64, mean, std, stem=weights.stem)
    fresh = load_pretrained(model.net, weights.state, weights.source)
    got = model.net.state_dict()
    assert fresh == ["fc.weight", "fc.bias"] and got["fc.weight"].shape == (10, 512)
    # the 3-channel stem summed over its input channels (timm's adapt_input_conv for grey input)
    torch.testing.assert_close(got["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True), rtol=0, atol=0)
    for k, v in state.items():
        if not k.startswith(("fc.", "conv1.")):
            assert torch.equal(got[k], v), k
    assert model.net.conv1.kernel_size == (7, 7) and not isinstance(model.net.maxpool, torch.nn.Identity)
    assert mean == [sum(IMAGENET_MEAN) / 3] and std == [sum(IMAGENET_STD) / 3]


def test_a_one_channel_stem_repeated_for_colour_data():
    from models.pretrained import adapt_input_conv
    w = torch.randn(8, 1, 3, 3)
    torch.testing.assert_close(adapt_input_conv(w, 3), w.repeat(1, 3, 1, 1) / 3)
    # a grey image through the repeated stem gives what it gave through the 1-channel one
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), adapt_input_conv(w, 3)),
                               torch.nn.functional.conv2d(x, w), rtol=1e-5, atol=1e-5)


def test_offline_with_an_empty_cache_says_where_to_put_the_file(tmp_path, monkeypatch):
    import torchvision.models._api as api
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*_a, **_k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"cannot get torchvision's resnet50 weights .* put it at .*"
                                        r"hub/checkpoints/resnet50-.*\.pth"):
        fetch_weights("resnet50", "default")


def test_state_dict_files_timm_and_bad_files(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = timm.create_model("resnet10t", num_classes=1000)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "timm.pth")  # a training checkpoint's layout
    weights = fetch_weights("timm/resnet10t", str(tmp_path / "timm.pth"))
    model = build_model("timm/resnet10t", 5, 3, 64, [0.5] * 3, [0.25] * 3)
    assert load_pretrained(model.net, weights.state, "timm.pth") == ["fc.weight", "fc.bias"]
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.net.state_dict()[k], v), k

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")  # another architecture
    other = build_model("resnet18", 10, 3, 64, [0.5] * 3, [0.25] * 3, stem="standard")
    with pytest.raises(UserError, match="has unexpected tensor"):
        load_pretrained(other.net, fetch_weights("resnet18", str(tmp_path / "r34.pth")).state, "r34.pth")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a readable weights file"):
        fetch_weights("resnet18", str(tmp_path / "evil.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable weights file"):
        fetch_weights("resnet18", str(tmp_path / "junk.pt"))
    with pytest.raises(UserError, match="has no published weights"):
        fetch_weights("fastresnet8", "default")
    with pytest.raises(UserError, match="takes neither"):
        build_model("timm/resnet10t", 5, 3, 64, [0.5] * 3, [0.25] * 3, attention="se")


@needs_fmnist
def test_pretrained_from_a_run_of_this_repository_end_to_end(tmp_path, capsys):
    """Pretrain, then fine-tune from its EMA weights with a new head: the body starts exactly at the EMA."""
    base = list(QUICK)  # its --epochs 1 is overridden by the --epochs given after it
    train.main(config.parse_args([*base, "--epochs", "1", "--ema", "--output_dir", str(tmp_path / "a")]))
    ema = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["ema"]["module"]
    seen = {}
    orig = train.load_pretrained

    def spy(net, state, source, **kw):
        fresh = orig(net, state, source, **kw)
        seen.update(net={k: v.clone() for k, v in net.state_dict().items()}, fresh=fresh)
        return fresh
    train.load_pretrained = spy
    try:
        train.main(config.parse_args([*base, "--epochs", "2", "--freeze_epochs", "1", "--layer_decay", "0.5",
                                      "--pretrained", str(tmp_path / "a" / "last.pt"), "--pretrained_use_ema",
                                      "--output_dir", str(tmp_path / "b")]))
    finally:
        train.load_pretrained = orig
    assert seen["fresh"] == []  # same classes: the head loads too
    for k, v in seen["net"].items():
        assert torch.equal(v, ema["net." + k]), k
    # other classes, even as many: the head starts fresh, the body loads (transfer to classes 5-9 from 0-4)
    train.main(config.parse_args([*base, "--classes", "0", "1", "2", "3", "4", "--epochs", "1",
                                  "--output_dir", str(tmp_path / "c")]))
    train.load_pretrained = spy
    try:
        train.main(config.parse_args([*base, "--classes", "Sandal", "6", "7", "8", "9", "--epochs", "1",
                                      "--pretrained", str(tmp_path / "c" / "last.pt"), "--output_dir",
                                      str(tmp_path / "d")]))
    finally:
        train.load_pretrained = orig
    assert len(seen["fresh"]) == 2 and all(k.endswith((".weight", ".bias")) for k in seen["fresh"])
    assert torch.load(tmp_path / "d" / "last.pt", weights_only=True)["class_names"] == \
        ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert "lr by stage" in capsys.readouterr().out
    for argv, fragment in (([*base, "--pretrained", str(tmp_path / "a" / "last.pt"), "--init", "orthogonal"],
                            "would overwrite the pretrained weights"),
                           ([*base, "--epochs", "1", "--freeze_epochs", "1"], "leaves no epoch to fine-tune"),
                           ([*base, "--layer_decay", "1.5"], "--layer_decay 1.5: must be in (0, 1]"),
                           ([*base, "--accum_steps", "0"], "--accum_steps 0: must be in [1, inf)"),
                           ([*base, "--model", "fastresnet8", "--pretrained"], "has no published weights")):
        assert fragment in cli_error(train.main, [*argv, "--output_dir", str(tmp_path / "x")], capsys)


def test_freeze_trains_only_the_head_with_frozen_batchnorm_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model = build_model("mlp_student", 3, 1, 8, [0.0], [1.0])
    model.net = net
    freeze = FreezeBackbone(model, epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    prec = make_precision(torch.device("cpu"), amp=False)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 1, 8, 8), generator=g, dtype=torch.uint8),
                torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert freeze.begin_epoch(0)
    train.train_one_epoch(model, batches, opt, None, train.make_criterion(), prec.scaler(), prec, 0,
                          train.StepTricks(freeze=freeze))
    after = model.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("net.5."), k  # only the head moved; BN buffers too stayed
    assert not freeze.begin_epoch(1) and all(p.requires_grad for p in model.parameters())
    train.train_one_epoch(model, batches, opt, None, train.make_criterion(), prec.scaler(), prec, 1,
                          train.StepTricks(freeze=None))
    assert not torch.equal(model.state_dict()["net.0.weight"], before["net.0.weight"])
    assert not torch.equal(model.state_dict()["net.1.running_mean"], before["net.1.running_mean"])


def test_layer_decay_and_head_lr_scale_closed_form():
    model = build_model("resnet18", 10, 3, 64, [0.5] * 3, [0.25] * 3)
    cfg = OptimizerOptions(batch_size=64, bias_decay=True, lr=0.1, lr_base_batch=0, momentum=0.9, nesterov=True,
                           norm_bias_lr_scale=1.0, opt="sgd", weight_decay=5e-4, layer_decay=0.6, head_lr_scale=3.0)
    opt = build_optimizer(model, cfg, 0.1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    depth = {"conv1": 5, "bn1": 5, "layer1": 4, "layer2": 3, "layer3": 2, "layer4": 1}
    for name, p in model.net.named_parameters():
        top = name.split(".")[0]
        want = 0.1 * 3.0 if top == "fc" else 0.1 * 0.6 ** depth[top]
        assert lr_of[id(p)] == pytest.approx(want, rel=1e-12), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@needs_fmnist
def test_accumulation_equals_the_big_batch_also_across_a_resume(tmp_path, monkeypatch):
    """mlp_student has no BatchNorm: batch 32 x 4 accumulated steps ends where batch 128 ends, to 1e-5."""
    common = ["--model", "mlp_student", "--train_subset", "512", "--eval_subset", "64", "--warmup_epochs", "0",
              "--device", "cpu", "--no_progress", "--deterministic", "--lr", "0.05", "--weight_decay", "1e-4",
              "--clip_grad", "1.0", "--ema", "--ema_decay", "0.9", *PLAIN]

    def run(out, *flags):
        train.main(config.parse_args([*common, *flags, "--output_dir", str(tmp_path / out)]))
        return torch.load(tmp_path / out / "last.pt", weights_only=True)

    big = run("big", "--batch_size", "128", "--epochs", "2")
    acc = run("acc", "--batch_size", "32", "--accum_steps", "4", "--epochs", "2")
    save_run = train.save_run

    def crash_after_epoch_1(*a):  # the run dies right after its first checkpoint
        save_run(*a)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_run", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run("half", "--batch_size", "32", "--accum_steps", "4", "--epochs", "2")
    monkeypatch.setattr(train, "save_run", save_run)
    resumed = run("half", "--resume", str(tmp_path / "half" / "last.pt"))
    for other in (acc, resumed):
        for key in ("model",):
            for k, v in big[key].items():
                torch.testing.assert_close(other[key][k], v, rtol=1e-5, atol=1e-5)
        for k, v in big["ema"]["module"].items():
            torch.testing.assert_close(other["ema"]["module"][k], v, rtol=1e-5, atol=1e-5)
        assert other["scheduler"]["iteration"] == big["scheduler"]["iteration"] == 2 * 4  # optimizer steps


def test_crop_pct_evaluates_a_centre_crop_and_trains_on_random_resized_crops(tmp_path):
    import numpy as np
    from PIL import Image

    from datasets.files import ImageFileDataset, load_image
    from datasets.transforms import build_train_transform
    # a 100 x 80 image whose columns count up: the centre crop keeps the middle columns, aspect kept
    arr = np.tile(np.arange(100, dtype=np.uint8)[None, :], (80, 1))
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(str(tmp_path / "wide.png"), 1, 64, crop_pct=0.8)  # shorter side 80 -> 80: no resize
    assert x.shape == (1, 64, 64)
    assert torch.equal(x[0, 0], torch.arange(18, 82, dtype=torch.uint8))  # columns (100 - 64) / 2 = 18 ..
    big = load_image(str(tmp_path / "wide.png"), 1, 64, crop_pct=0.8, center_crop=False)
    assert big.shape == (1, 80, 80) and torch.equal(big[0, 0], torch.arange(10, 90, dtype=torch.uint8))
    cfg = train.data_options(config.parse_args(["--crop_pct", "0.8"]))
    t = build_train_transform(cfg, 1, 64)
    ds = ImageFileDataset([str(tmp_path / "wide.png")], [0], 1, 64, t, crop_pct=0.8, train=True)
    outs = [ds[0][0] for _ in range(5)]
    assert all(o.shape == (1, 64, 64) for o in outs) and len({o.float().mean().item() for o in outs}) > 1
    with pytest.raises(UserError, match="--crop_pct is the evaluation preset for file datasets"):
        __import__("datasets").build_data(train.data_options(config.parse_args(["--crop_pct", "0.875"])))


def test_a_deploy_checkpoint_is_refused_in_one_line(tmp_path):
    """Fused conv + BatchNorm (reparam_export.py) matches no train-form model: the message names the way out."""
    from models import model_config
    from models.reparam import reparameterize_model
    mcfg = model_config("resnet8", 10, 1, 28, [0.5], [0.25], acb=True)
    deploy = reparameterize_model(build_model("resnet8", 10, 1, 28, [0.5], [0.25], acb=True).eval())
    torch.save({"model": deploy.state_dict(), "model_config": {**mcfg, "reparameterized": True}},
               tmp_path / "deploy.pt")
    with pytest.raises(UserError, match="is a deploy checkpoint .* fine-tune from the checkpoint it was exported"):
        fetch_weights("resnet8", str(tmp_path / "deploy.pt"))


@needs_fmnist
def test_freeze_epochs_reaches_the_loop_for_exactly_its_epochs(tmp_path, monkeypatch):
    seen, orig = [], train.train_one_epoch

    def spy(*a, **kw):
        freeze = a[8].freeze
        seen.append(freeze is not None and freeze.frozen)
        return orig(*a, **kw)
    monkeypatch.setattr(train, "train_one_epoch", spy)
    base = list(QUICK)  # its --epochs 1 is overridden by the --epochs given after it
    train.main(config.parse_args([*base, "--epochs", "3", "--freeze_epochs", "2", "--output_dir", str(tmp_path)]))
    assert seen == [True, True, False]


def test_crop_pct_reaches_the_file_loaders(tmp_path):
    """build_data with --crop_pct evaluates on load_image's centre crop, and trains on 64-px random crops."""
    import numpy as np
    from PIL import Image

    import datasets
    from datasets.files import load_image
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (80, 100), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    args = config.parse_args(["--dataset", "imagefolder", "--data_dir", str(tmp_path), "--img_size", "64",
                              "--crop_pct", "0.8", "--in_chans", "1", "--val_ratio", "0.5", "--batch_size", "4"])
    data = datasets.build_data(train.data_options(args))
    ds = data.val_loader.loader.dataset  # the torch DataLoader inside
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], load_image(ds.paths[i], 1, 64, crop_pct=0.8))
    x, _ = next(iter(data.train_loader))[:2]
    assert x.shape[-2:] == (64, 64)
