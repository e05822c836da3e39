"""EMA math against a hand computation (spec E: EMA; seed 003 constant decay, diffusers ramp)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffalign.engine.ema import EMA, ema_decay_at
from diffalign.engine.errors import DiffalignError


def _hand_ema(trajectory: list[torch.Tensor], init: torch.Tensor, decays: list[float]):
    s = init.double().clone()
    for p, d in zip(trajectory, decays):
        s = d * s + (1.0 - d) * p.double()
    return s


def test_decay_schedules():
    assert ema_decay_at(0, 0.9995) == 0.9995
    assert ema_decay_at(10_000, 0.9995) == 0.9995
    # diffusers EMAModel ramp: min(decay, (1 + s) / (10 + s)) with s the 0-based step
    assert ema_decay_at(0, 0.9995, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(5, 0.9995, warmup=True) == pytest.approx(6 / 15)
    assert ema_decay_at(10**6, 0.9995, warmup=True) == 0.9995


@pytest.mark.parametrize("warmup", [False, True])
def test_update_matches_hand_computation(warmup):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    ema = EMA({"lin": lin, "frozen": frozen}, decay=0.8, warmup=warmup)
    assert set(ema.shadow) == {"lin.weight", "lin.bias"}  # frozen parameters are not averaged
    init = lin.weight.detach().clone()
    traj, decays = [], []
    for step in range(7):
        with torch.no_grad():
            lin.weight.add_(torch.randn_like(lin.weight))
        traj.append(lin.weight.detach().clone())
        decays.append(min(0.8, (1 + step) / (10 + step)) if warmup else 0.8)
        assert ema.update(step) == pytest.approx(decays[-1])
    expected = _hand_ema(traj, init, decays)
    torch.testing.assert_close(ema.shadow["lin.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    assert ema.shadow["lin.weight"].dtype == torch.float32


def test_shadow_is_fp32_for_bf16_params():
    lin = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA({"lin": lin}, decay=0.5)
    assert ema.shadow["lin.weight"].dtype == torch.float32
    ema.update(0)
    with ema.applied():
        assert lin.weight.dtype == torch.bfloat16


def test_swap_in_out_restores_live_weights():
    torch.manual_seed(1)
    lin = nn.Linear(3, 3)
    ema = EMA({"m": lin}, decay=0.9)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(0)
    live = lin.weight.detach().clone()
    with ema.applied():
        torch.testing.assert_close(lin.weight, 0.9 * start + 0.1 * live)
    torch.testing.assert_close(lin.weight, live)
    # restored also when the block raises
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("boom")
    torch.testing.assert_close(lin.weight, live)


def test_state_dict_roundtrip_and_mismatch():
    torch.manual_seed(2)
    a = EMA({"m": nn.Linear(3, 3)}, decay=0.9)
    a.update(0)
    a.update(1)
    sd = a.state_dict()
    b = EMA({"m": nn.Linear(3, 3)}, decay=0.9)
    b.load_state_dict(sd)
    assert b.num_updates == 2
    torch.testing.assert_close(b.shadow["m.weight"], a.shadow["m.weight"])
    c = EMA({"m": nn.Linear(3, 4)}, decay=0.9)
    with pytest.raises(DiffalignError, match="shape"):
        c.load_state_dict(sd)
    d = EMA({"other": nn.Linear(3, 3)}, decay=0.9)
    with pytest.raises(DiffalignError, match="does not match"):
        d.load_state_dict(sd)


def test_bad_decay():
    with pytest.raises(DiffalignError):
        EMA({"m": nn.Linear(1, 1)}, decay=1.0)
