"""tools/lion.py: Lion follows its update rule; train.py's weight decay only on weight matrices,
for AdamW and Lion alike; a Lion run trains through train.py's loop."""
import pytest
import torch

from helpers import TINY, run, train_records
from tools.lion import Lion, make_lion
from train import make_optimizer

CFG = dict(weight_decay=0.1, learning_rate=1e-2)


def test_lion_takes_the_sign_of_the_interpolated_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w0, m = w.detach().clone(), torch.zeros(5)
    opt = Lion([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    for _ in range(3):
        g = torch.randn(5)
        w.grad = g.clone()
        opt.step()
        w0 = w0 * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)     # the paper's Algorithm 2
        m = 0.99 * m + 0.01 * g
        assert torch.allclose(w.detach(), w0, atol=1e-6)
    assert torch.allclose(opt.state[w]["momentum"], m, atol=1e-6)


@pytest.mark.parametrize("make, kind", [(make_optimizer, torch.optim.AdamW), (make_lion, Lion)])
def test_weight_decay_only_on_matrices_and_gate_logits_learn_faster(make, kind):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_parameter("log_alpha", torch.nn.Parameter(torch.zeros(3)))
    opt = make(model, CFG, lr_scale={"log_alpha": 10.0})
    assert isinstance(opt, kind)
    decay = {(g["weight_decay"], g["lr_scale"]): sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert decay == {(0.1, 1.0): 12, (0.0, 1.0): 3 + 3 + 3, (0.0, 10.0): 3}


def test_a_lion_run_trains_with_train_pys_loop(tmp_path):
    out = run("tools/lion.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=30", "--eval_interval=30",
              "--learning_rate=3e-4", "--beta2=0.99")
    assert "done: 30 steps" in out.stdout
    losses = [r["loss"] for r in train_records(tmp_path)]
    assert losses[-1] < losses[0]
