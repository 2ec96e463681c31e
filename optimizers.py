"""
How the weights move: AdamW (Loshchilov & Hutter 2019) or Lion (Chen et al. 2023, written out
below), with decoupled weight decay on the weight matrices only and per-group learning-rate
multipliers (prune.py's gate logits learn faster than the weights). train.py sets each group's
learning rate every step from its one-cycle schedule. Leaves out: Adafactor, Muon, 8-bit states.
"""

import torch

from configurator import ConfigError


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): step in the
    direction of the sign of a mix of momentum and gradient, so every weight moves by exactly
    lr per step, with one moment to store instead of AdamW's two:

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
            (beta1, beta2), lr = group["betas"], group["lr"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                if "momentum" not in self.state[w]:
                    self.state[w]["momentum"] = torch.zeros_like(w)
                m = self.state[w]["momentum"]
                w.mul_(1 - lr * group["weight_decay"])
                w.add_(torch.lerp(w.grad, m, beta1).sign_(), alpha=-lr)      # lerp(g, m, b1) = b1 m + (1 - b1) g
                m.lerp_(w.grad, 1 - beta2)                                   # m + (1 - b2)(g - m)


def make_optimizer(model, cfg: dict, lr_scale: dict | None = None) -> torch.optim.Optimizer:
    """AdamW or Lion, with decoupled weight decay, on the trainable parameters. No weight decay on
    1-d parameters (biases, LayerNorm gains, gate logits). lr_scale {name suffix: multiplier}:
    groups that learn at a multiple of the schedule's rate (prune.py's gate logits)."""
    groups = {}                               # (weight decay?, lr multiplier) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((m for suffix, m in (lr_scale or {}).items() if name.endswith(suffix)), 1.0)
            groups.setdefault((p.dim() >= 2, scale), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg["weight_decay"] if decays else 0.0, "lr_scale": scale}
                    for (decays, scale), ps in groups.items()]
    betas = (cfg["beta1"], cfg["beta2"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg["learning_rate"], betas=betas, fused=True)
    if cfg["optimizer"] == "lion":
        return Lion(param_groups, lr=cfg["learning_rate"], betas=betas)
    raise ConfigError(f"optimizer='{cfg['optimizer']}' is not known: use 'adamw' or 'lion'")
