"""--fp32_precision: bf16 math on the CPU is the fp32 convolution/matmul of bf16-rounded inputs (fp32
accumulation), checked against that computation done in IEEE fp32; a CPU whose oneDNN ignores the setting (AMD
Zen 4) is found by a probe and refused; impossible device/mode pairs are one-line errors before anything is
written."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_error

from engine.precision import bf16_conv_math_active
from utils.errors import UserError

BACKENDS = (torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul, torch.backends.cudnn.conv,
            torch.backends.cuda.matmul)
has_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                              reason="this CPU has no bf16 instructions (AVX512-BF16/AMX)")


bf16_cpu = pytest.mark.skipif(not bf16_conv_math_active(),
                              reason="oneDNN runs no bf16 math for fp32 convolutions on this CPU (or it has no "
                                     "bf16 instructions): --fp32_precision bf16 is refused here")


@pytest.fixture(autouse=True)
def restore_precision():
    """The setting is process-wide: give later tests torch's own."""
    saved = [b.fp32_precision for b in BACKENDS]
    yield
    for b, mode in zip(BACKENDS, saved):
        b.fp32_precision = mode


def rounded(t):
    return t.to(torch.bfloat16).float()


@bf16_cpu
def test_bf16_conv_is_fp32_conv_of_bf16_rounded_inputs():
    from engine.precision import set_fp32_precision
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    set_fp32_precision(torch.device("cpu"), "ieee")
    exact = F.conv2d(x, w, padding=1)
    reference = F.conv2d(rounded(x), rounded(w), padding=1)  # bf16 inputs, fp32 products and sums
    set_fp32_precision(torch.device("cpu"), "bf16")
    fast = F.conv2d(x, w, padding=1)
    assert fast.dtype == torch.float32
    scale = exact.abs().max()
    assert (fast - reference).abs().max() < 1e-5 * scale  # only the summation order differs
    assert (fast - exact).abs().max() > 1e-4 * scale  # and the rounding did happen

    # the weight gradient goes through oneDNN too: again the rounded inputs' fp32 gradient
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xr, wr, padding=1).square().sum().backward()
    set_fp32_precision(torch.device("cpu"), "ieee")
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xe, we, padding=1).square().sum().backward()
    rel = (wr.grad - we.grad).norm() / we.grad.norm()
    assert 1e-5 < rel < 2e-2, rel  # bf16's 8-bit mantissa: close to, not equal to, IEEE


@has_bf16
def test_the_probe_says_what_a_larger_convolution_does():
    # a different shape and layout from the probe's: under the bf16 setting the output changes iff the probe says
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 32, 10, 10, generator=g), torch.randn(64, 32, 3, 3, generator=g)
    conv = torch.backends.mkldnn.conv
    out = []
    for mode in ("ieee", "bf16"):
        conv.fp32_precision = mode
        out.append(F.conv2d(x, w, padding=1))
    conv.fp32_precision = "ieee"
    assert bf16_conv_math_active() == (not torch.equal(*out))
    assert conv.fp32_precision == "ieee"  # the probe put the setting back


def test_bf16_math_is_refused_where_it_would_change_nothing(monkeypatch):
    from engine import precision as misc
    before = torch.backends.mkldnn.conv.fp32_precision
    monkeypatch.setattr(misc, "bf16_conv_math_active", lambda: False)  # what an AMD Zen 4's probe answers
    with pytest.raises(UserError, match="--fp32_precision bf16 (would change nothing|needs a CPU)"):
        misc.set_fp32_precision(torch.device("cpu"), "bf16")
    assert torch.backends.mkldnn.conv.fp32_precision == before  # nothing was switched on


def test_impossible_device_and_mode_pairs_are_refused():
    from engine.precision import set_fp32_precision
    with pytest.raises(UserError, match="tf32 is a CUDA setting"):
        set_fp32_precision(torch.device("cpu"), "tf32")
    with pytest.raises(UserError, match="bf16 is a CPU .* setting"):
        set_fp32_precision(torch.device("cuda"), "bf16")
    set_fp32_precision(torch.device("cpu"), "default")  # torch's own: nothing changes
    assert torch.backends.mkldnn.conv.fp32_precision in ("none", "ieee")


def test_train_refuses_tf32_on_cpu_before_writing(tmp_path, capsys):
    import train
    out = tmp_path / "run"
    err = cli_error(train.main, ["--fp32_precision", "tf32", "--device", "cpu", "--output_dir", str(out)], capsys)
    assert "--fp32_precision tf32 is a CUDA setting" in err
    assert not os.path.exists(out)
