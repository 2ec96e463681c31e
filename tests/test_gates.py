"""gates.py: hard-concrete statistics match their formulas; the L0 penalty steers gates to a head count."""
import torch

from gates import HardConcreteGate, L0Penalty, eval_gates


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


def test_a_target_head_count_steers_the_expected_number_of_open_gates():
    """The Lagrangian penalty alone (no translation loss) moves 8 gates from all open to ~3 open,
    following the ramp of the count aimed at instead of closing everything at once."""
    torch.manual_seed(0)
    gates = {"enc": [HardConcreteGate(4), HardConcreteGate(4)]}
    steps = 600
    penalty = L0Penalty(gates, 0.0, 1.0, target=3, progress=lambda: penalty.steps / steps, ramp=0.5)
    opt = torch.optim.Adam([g.log_alpha for g in gates["enc"]], lr=0.05)
    fewest, pushed = 8.0, 0.0
    for step in range(steps):
        opt.zero_grad()
        penalty().backward()
        opt.step()
        expected_open = sum(g.l0().item() for g in gates["enc"])
        if step >= steps // 4:
            fewest = min(fewest, expected_open)
        pushed = max(pushed, penalty.multipliers[0].item())
    assert penalty.heads_aimed_at() == 3
    assert abs(expected_open - 3) < 0.5, expected_open
    assert fewest > 2, fewest                                   # no overshoot far below the target
    assert pushed > 0.1                                         # lambda_1 rose to push gates closed


def test_the_quadratic_steer_settles_exactly_k_gates_on_the_most_useful():
    """Against a loss that wants every gate open (sum of usefulness_h * (1 - z_h), a stand-in for
    the translation loss), the one-sided quadratic penalty closes gates only while more than the
    count aimed at are expected open: at the end exactly 3 of 8 deterministic gates are open, and
    they are the 3 most useful ones."""
    torch.manual_seed(0)
    gates = {"enc": [HardConcreteGate(4), HardConcreteGate(4)]}
    usefulness = torch.tensor([0.02, 0.001, 0.05, 0.003, 0.002, 0.04, 0.004, 0.005])
    steps = 800
    penalty = L0Penalty(gates, 0.0, 1.0, target=3, progress=lambda: penalty.steps / steps, ramp=0.5,
                        steer="quadratic")
    opt = torch.optim.Adam([g.log_alpha for g in gates["enc"]], lr=0.05)
    fewest = 8.0
    for step in range(steps):
        opt.zero_grad()
        z = torch.cat([g() for g in gates["enc"]])
        ((usefulness * (1 - z)).sum() + penalty()).backward()
        opt.step()
        if step >= steps // 2:
            fewest = min(fewest, sum(g.l0().item() for g in gates["enc"]))
    z = torch.cat(eval_gates(gates)["enc"])
    assert (z > 0).nonzero().flatten().tolist() == [0, 2, 5]
    assert fewest > 2.5, fewest                                 # never far below the target
    assert "lambda_1" not in penalty.log(steps) and penalty.log(steps)["aim"] == 3
