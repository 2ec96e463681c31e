"""gates.py: hard-concrete statistics match their formulas."""
import torch

from gates import HardConcreteGate


def test_monte_carlo_open_rate_matches_expected_l0():
    torch.manual_seed(0)
    gate = HardConcreteGate(5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    gate.train()
    samples = torch.stack([gate() for _ in range(20000)])             # (N, 5)
    observed = (samples != 0).float().mean(0)
    assert torch.allclose(observed, gate.prob_open().detach(), atol=0.015)
    assert abs(gate.l0().item() - observed.sum().item()) < 0.05
    assert (samples == 0).any() and (samples == 1).any()              # the stretch makes exact 0 and 1 reachable


def test_eval_gate_is_deterministic_and_in_unit_interval():
    gate = HardConcreteGate(4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-10.0, -0.5, 0.5, 10.0]))
    gate.eval()
    z = gate()
    assert torch.equal(z, gate()) and ((0 <= z) & (z <= 1)).all()
    assert z[0] == 0 and z[3] == 1                                    # far-closed and far-open gates saturate
    expected = (torch.sigmoid(gate.log_alpha) * 1.2 - 0.1).clamp(0, 1)
    assert torch.allclose(z, expected)


def test_penalty_and_samples_are_differentiable():
    gate = HardConcreteGate(3)
    gate.train()
    (gate().sum() + gate.l0()).backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0
