"""
Train with Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") instead of
AdamW: train.py's loop with its optimizer swapped, for the study in docs/results.md ("AdamW or
Lion"; Lion fell far behind AdamW there, so train.py uses AdamW only).

    python tools/lion.py config/transformer_multi30k.py --dataset=../shared/data/multi30k_en_de \
        --max_minutes=10 --learning_rate=3e-4 --weight_decay=0.05 --beta2=0.99

Every train.py knob works; beta1 and beta2 are this script's. Resume a Lion run with this script
(and the same betas): train.py would resume it with AdamW, whose state does not fit.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
import train  # noqa: E402
from configurator import configure, main_guard  # noqa: E402
from data import DataError  # noqa: E402

beta1 = 0.9  # how much momentum the update's sign reads
beta2 = 0.99  # momentum decay (the paper's 0.99)


class Lion(torch.optim.Optimizer):
    """Step in the direction of the sign of a mix of momentum and gradient, so every weight moves
    by exactly lr per step, with one moment to store instead of AdamW's two:

        c = beta1 * m + (1 - beta1) * g          the direction: only its sign is used
        w = w - lr * (sign(c) + weight_decay * w)
        m = beta2 * m + (1 - beta2) * g          momentum, updated after the step

    Its steps are larger than AdamW's, so it wants a 3-10x smaller learning rate and a 3-10x
    larger weight decay (the paper's advice)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                if "momentum" not in self.state[w]:
                    self.state[w]["momentum"] = torch.zeros_like(w)
                m = self.state[w]["momentum"]
                w.mul_(1 - lr * group["weight_decay"])
                w.add_(torch.lerp(w.grad, m, b1).sign_(), alpha=-lr)      # lerp(g, m, b1) = b1 m + (1 - b1) g
                m.lerp_(w.grad, 1 - b2)                                   # m + (1 - b2)(g - m)


def make_lion(model, cfg: dict, lr_scale: dict | None = None, betas: tuple = (0.9, 0.99)) -> Lion:
    """Lion on train.py's parameter groups (weight decay on matrices only, learning-rate multipliers)."""
    return Lion(train.param_groups(model, cfg, lr_scale), lr=cfg["learning_rate"], betas=betas)


def main() -> None:
    ours = [a for a in sys.argv[1:] if a.split("=")[0] in ("--beta1", "--beta2")]
    configure(globals(), ours, doc_files=(__file__,))
    # train.main builds its optimizer with train.make_optimizer: this process's one is Lion
    train.make_optimizer = lambda model, cfg, lr_scale=None: make_lion(model, cfg, lr_scale, (beta1, beta2))
    train.main([a for a in sys.argv[1:] if a not in ours])


if __name__ == "__main__":
    main_guard(main, DataError)
