"""
Hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through
L0 Regularization"), one per attention head as in Voita et al. 2019 ("Analyzing Multi-Head
Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned").

Each gate z in [0, 1] multiplies one head's output. In training z is sampled from a stretched,
clipped binary-concrete distribution, so it is exactly 0 or exactly 1 with non-zero probability
and still differentiable in log_alpha; the expected number of non-zero gates (the L0 norm) is a
smooth function of log_alpha that a penalty can push down. This module knows nothing about
Transformers: prune.py attaches it. Leaves out: gates on other units (neurons, layers).
"""

import math

import torch
import torch.nn as nn


class HardConcreteGate(nn.Module):
    """n gates with learnable log_alpha; forward() returns z of shape (n,).

    Defaults from Voita et al.'s code: temperature beta = 0.33, stretch interval (l, r) =
    (-0.1, 1.1). The stretch beyond [0, 1] is what lets a gate reach exactly 0 or 1: with
    r = 1.0 the clamp at 1 would almost never bite and gates would never close fully.
    """

    def __init__(self, n: int, beta: float = 0.33, l: float = -0.1, r: float = 1.1,  # noqa: E741
                 init_open: float = 0.9, eps: float = 1e-6):
        super().__init__()
        self.beta, self.l, self.r, self.eps = beta, l, r, eps
        # start mostly open: log_alpha such that the deterministic gate is ~init_open of the way up
        self.log_alpha = nn.Parameter(torch.full((n,), math.log(init_open / (1 - init_open))))

    def forward(self) -> torch.Tensor:
        if self.training:
            # u ~ U(eps, 1 - eps);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
            u = torch.rand_like(self.log_alpha).clamp(self.eps, 1 - self.eps)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / self.beta)
        else:
            # evaluation: the noise-free gate s = sigmoid(log_alpha)
            s = torch.sigmoid(self.log_alpha)
        # stretch to (l, r), then clip to [0, 1]:  z = clamp(s * (r - l) + l, 0, 1)
        return (s * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def prob_open(self) -> torch.Tensor:
        """P(z != 0) per gate: 1 - Q(s <= -l / (r - l)) = sigmoid(log_alpha - beta * log(-l / r))."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.l / self.r))

    def l0(self) -> torch.Tensor:
        """Expected L0 norm (expected number of open gates): sum_i sigmoid(log_alpha_i - beta log(-l/r))."""
        return self.prob_open().sum()
