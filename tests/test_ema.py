"""ModelEMA against the closed-form exponential average of a known weight sequence."""
import io

import pytest
import torch
from torch import nn

from tricks.ema import ModelEMA


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(3, 4)).to(dtype)


def set_weights(model, t, gen):
    """Give every floating tensor (parameters and BN running stats) new random values; integers become t."""
    with torch.no_grad():
        for v in model.state_dict().values():  # state_dict tensors share storage with the model
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=gen, dtype=torch.float64))
            else:
                v.fill_(t)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_sequence(model, ema, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    states = []
    for t in range(1, n + 1):
        states.append(set_weights(model, t, gen))
        ema.update(model)
    return states


def expected_average(w0, states, decays):
    """sum_t (1 - d_t) prod_{s>t} d_s w_t + prod_t d_t w_0, written out as products (not a recursion)."""
    n = len(states)
    out = {}
    for k, v0 in w0.items():
        if not v0.is_floating_point():
            out[k] = states[-1][k]
            continue
        acc = torch.tensor(decays, dtype=torch.float64).prod() * v0
        for t in range(n):
            tail = torch.tensor(decays[t + 1:], dtype=torch.float64).prod()
            acc = acc + (1 - decays[t]) * tail * states[t][k]
        out[k] = acc
    return out


def test_constant_decay_matches_closed_form_including_bn_buffers():
    model, d, n = tiny_model(), 0.7, 6
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEMA(model, d)
    states = run_sequence(model, ema, n)
    want = {k: (d ** n * v0 + sum((1 - d) * d ** (n - t) * states[t - 1][k] for t in range(1, n + 1))
                if v0.is_floating_point() else states[-1][k]) for k, v0 in w0.items()}
    got = ema.module.state_dict()
    assert "1.running_mean" in got and "1.num_batches_tracked" in got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)
    assert int(got["1.num_batches_tracked"]) == n  # copied, not averaged
    assert ema.num_updates == n


def test_decay_zero_copies_exactly():
    model = tiny_model(torch.float32)
    ema = ModelEMA(model, 0.0)
    states = run_sequence(model, ema, 2)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, states[-1][k]), k


def test_warmup_schedule_formula_and_effect():
    ema = ModelEMA(tiny_model(), 0.6, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(8) == pytest.approx(9 / 18)
    assert ema.decay_at(20) == pytest.approx(0.6)  # capped at the decay
    assert ModelEMA(tiny_model(), 0.6).decay_at(0) == 0.6

    model, n = tiny_model(), 12
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEMA(model, 0.6, warmup=True)
    states = run_sequence(model, ema, n)
    decays = [min(0.6, t / (9 + t)) for t in range(1, n + 1)]  # update t sees n = t - 1 earlier updates
    want = expected_average(w0, states, decays)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-12, atol=1e-12, msg=k)


def test_ema_module_is_frozen_eval_copy():
    model = tiny_model()
    ema = ModelEMA(model, 0.9)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema.module[0].weight, model[0].weight)


@pytest.mark.parametrize("ema_cl,model_cl,model_dtype", [(False, True, torch.float32), (True, False, torch.float32),
                                                         (False, False, torch.bfloat16)])
def test_channels_last_and_dtype(ema_cl, model_cl, model_dtype):
    d = 0.8
    fmt = {True: torch.channels_last, False: torch.contiguous_format}
    model = tiny_model(torch.float32).to(memory_format=fmt[ema_cl])
    ema = ModelEMA(model, d)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model.to(dtype=model_dtype, memory_format=fmt[model_cl])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=gen))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) == model_cl
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last) == ema_cl
    ema.update(model)
    assert ema.module[0].weight.dtype == torch.float32
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            want = d * before[k] + (1 - d) * model.state_dict()[k].float()
            torch.testing.assert_close(v, want, msg=k)


def test_update_with_another_model_is_an_error():
    ema = ModelEMA(tiny_model(), 0.5)
    with pytest.raises(ValueError, match="parameters and buffers"):
        ema.update(nn.Linear(3, 4).double())


def test_state_dict_resume_continues_identically():
    def fresh():
        m = tiny_model()
        return m, ModelEMA(m, 0.9, warmup=True)

    model, ema = fresh()
    run_sequence(model, ema, 10, seed=5)

    model2, ema2 = fresh()
    gen = torch.Generator().manual_seed(5)
    for t in range(1, 6):
        set_weights(model2, t, gen)
        ema2.update(model2)
    buf = io.BytesIO()
    torch.save(ema2.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model3 = tiny_model()
    set_weights(model3, 0, torch.Generator().manual_seed(99))  # the new EMA starts from other weights
    ema3 = ModelEMA(model3, 0.9, warmup=True)
    ema3.load_state_dict(sd)
    assert ema3.num_updates == 5 and sd["decay"] == 0.9
    for t in range(6, 11):
        set_weights(model3, t, gen)
        ema3.update(model3)
    assert ema3.num_updates == 10
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, ema3.module.state_dict()[k]), k


def test_source_lookup_follows_parameters_order_shared_weights_and_replaced_buffers():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.BatchNorm1d(3), shared, nn.ReLU(), shared).double()  # weight tying
    ema = ModelEMA(model, 0.5)
    ema.update(model)
    slots = ema._source[1]
    want = list(model.parameters()) + list(model.buffers())
    assert len(slots) == len(want) and all(d[k] is t for (d, k), t in zip(slots, want))
    # A buffer replaced after the first update (module.to() does that) is read, not a stale copy.
    model[0].running_mean = torch.full((3,), 4.0, dtype=torch.float64)
    before = ema.module[0].running_mean.clone()
    ema.update(model)
    torch.testing.assert_close(ema.module[0].running_mean, 0.5 * before + 0.5 * 4.0)


def test_update_through_ddp_wrapper(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        a, b = ModelEMA(model, 0.5), ModelEMA(model, 0.5)
        ddp = nn.parallel.DistributedDataParallel(model)
        set_weights(model, 1, torch.Generator().manual_seed(0))
        a.update(model)
        b.update(ddp)
        for k, v in a.module.state_dict().items():
            assert torch.equal(v, b.module.state_dict()[k]), k
    finally:
        dist.destroy_process_group()
