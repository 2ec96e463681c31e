"""
Hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through
L0 Regularization"), one per attention head as in Voita et al. 2019 ("Analyzing Multi-Head
Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned").

Each gate z in [0, 1] multiplies one head's output. In training z is sampled from a stretched,
clipped binary-concrete distribution, so it is exactly 0 or exactly 1 with non-zero probability
and still differentiable in log_alpha; the expected number of open gates (the L0 norm) is a
smooth function of log_alpha that a penalty pushes down (L0Penalty: lambda x L0, or a term
that steers the expected count to K heads). attach_gates puts one gate per head on a model's
attention modules (set_head_gate: a forward pre-hook on each out_proj); prune.py trains them.
Leaves out: gates on other units (neurons, layers).
"""

import math

import torch
import torch.nn as nn

STEERS = ("lagrangian", "quadratic")  # the ways L0Penalty can steer the expected count of open gates to K


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


def set_head_gate(attn, gate) -> None:
    """Put `gate` (a module, or any callable, returning (H,) multipliers) on one attention module,
    or take its gate off (gate=None). Each head's output is scaled by its multiplier before
    out_proj, whose input (B, T, H*Dh) holds the heads side by side: a forward pre-hook on
    out_proj, so the model itself knows nothing of gates. The gate is kept as attn.head_gate: a
    gate module's parameters are the model's, trained and saved with it."""
    if getattr(attn, "gate_hook", None) is not None:
        attn.gate_hook.remove()
    attn.head_gate, attn.gate_hook = gate, None
    if gate is None:
        return

    def scale_heads(out_proj, inputs: tuple) -> tuple:
        x = inputs[0].unflatten(-1, (attn.n_head, attn.head_dim))      # (B, T, H, Dh)
        return ((x * gate().to(x.dtype)[:, None]).flatten(-2),)         # one multiplier per head
    attn.gate_hook = attn.out_proj.register_forward_pre_hook(scale_heads)


def attach_gates(model, attn_types: list[str]) -> dict:
    """Put a gate of one value per head on every attention module of the given types (model.
    attention_modules(): 'enc', 'dec', 'cross'). Returns {type: [gate per layer]}."""
    modules = model.attention_modules()
    gates = {}
    for kind in attn_types:
        gates[kind] = []
        for attn in modules[kind]:
            set_head_gate(attn, HardConcreteGate(attn.n_head))
            gates[kind].append(attn.head_gate)
    return gates


def gated_types(model) -> list[str]:
    """The attention types whose heads carry gates (a checkpoint written while gating records them)."""
    modules = model.attention_modules() if hasattr(model, "attention_modules") else {}
    return [kind for kind, layers in modules.items() if any(getattr(m, "head_gate", None) is not None for m in layers)]


def eval_gates(gates: dict) -> dict:
    """{type: [(H,) deterministic gate values per layer]} in eval mode (a closed head has exactly 0)."""
    out = {}
    for kind, layer_gates in gates.items():
        out[kind] = []
        for g in layer_gates:
            was = g.training
            g.eval()
            with torch.no_grad():
                out[kind].append(g().float())
            g.train(was)
    return out


class L0Penalty:
    """The term train_loop adds to every step's loss, for gates {type: [gate per layer]}.

    With a lambda:   lambda * L0,   L0 = the expected number of open heads (sum of P(gate open))
                                    over the heads of a layer, averaged over the gated layers.
    With a target of K heads, the expected share of gated heads open, s, is steered to the share
    aimed at now, t, which falls linearly from all heads to K / gated heads over the first `ramp`
    share of the run (progress() in [0, 1]) and then stays there, in one of two ways (`steer`):

    'lagrangian' (the Lagrangian relaxation of "keep K heads", Wang et al. 2020):
        lambda_1 (s - t) + lambda_2 (s - t)^2,
    the multipliers rising by gradient ascent with their own Adam (d/d lambda_1 = s - t,
    d/d lambda_2 = (s - t)^2, written out so that loss scaling does not touch them). Its memory is
    its weakness: lambda_1 pushes gates closed until it has fallen below zero, and a closed gate
    gets almost no gradient to reopen, so the count overshoots below K.

    'quadratic' (a one-sided spring, no memory):   stiffness / 2 * max(0, s - t)^2.
    The translation loss, which wants heads open, holds s just above t, so the count does not
    overshoot; stiffness 1000: one head too many in 72 pulls with ~14.

    The ramp lets the weights follow the gates (as in CoFi, Xia et al. 2022; docs/pruning.md shows
    what aiming at K from the first step did). The penalty also
    tells the loop what to log (kept in `history` for the plots) and lets the gate logits learn
    gate_lr_scale times faster than the weights."""

    def __init__(self, gates: dict, lam: float, gate_lr_scale: float, target: int | None = None,
                 progress=lambda: 1.0, ramp: float = 0.5, steer: str = "lagrangian", multiplier_lr: float = 0.01,
                 stiffness: float = 1000.0):
        if steer not in STEERS:
            raise ValueError(f"steer='{steer}': use one of {', '.join(STEERS)}")
        self.gates, self.lam, self.target, self.progress, self.ramp = gates, lam, target, progress, ramp
        self.steer, self.stiffness = steer, stiffness
        self.n_layers = sum(len(layers) for layers in gates.values())
        self.n_heads = sum(g.log_alpha.numel() for layers in gates.values() for g in layers)
        self.lr_scale = {"log_alpha": gate_lr_scale}
        self.history: list[dict] = []
        self.steps = 0                                                        # calls so far: one per step
        if target is not None and steer == "lagrangian":
            device = next(iter(gates.values()))[0].log_alpha.device
            self.multipliers = torch.zeros(2, device=device)                  # lambda_1, lambda_2
            self.ascent = torch.optim.Adam([self.multipliers], lr=multiplier_lr, maximize=True)

    def __call__(self) -> torch.Tensor:
        self.steps += 1
        expected_open = sum(g.l0() for layers in self.gates.values() for g in layers)
        if self.target is None:
            return self.lam * expected_open / self.n_layers
        gap = (expected_open - self.heads_aimed_at()) / self.n_heads          # s - t
        if self.steer == "quadratic":
            return 0.5 * self.stiffness * torch.relu(gap) ** 2
        self.multipliers.grad = torch.stack([gap, gap ** 2]).detach()
        self.ascent.step()
        return self.multipliers[0] * gap + self.multipliers[1] * gap ** 2

    def heads_aimed_at(self) -> float:
        """All gated heads at the start, K from `ramp` of the way through the run on."""
        done = min(1.0, self.progress() / self.ramp) if self.ramp > 0 else 1.0
        return self.n_heads + (self.target - self.n_heads) * done

    def log(self, step: int) -> dict:
        z = eval_gates(self.gates)
        p_open = {k: [g.prob_open().detach().cpu().tolist() for g in v] for k, v in self.gates.items()}
        open_now = {k: int(sum((zi > 0).sum() for zi in v)) for k, v in z.items()}
        if not self.history or self.history[-1]["step"] != step:
            self.history.append({"step": step, "p_open": p_open, "heads_open": open_now})
        n_head = len(p_open[next(iter(p_open))][0])
        extra = {"heads_open": " ".join(f"{k} {v}/{n_head * len(self.gates[k])}" for k, v in open_now.items()),
                 "l0": round(sum(sum(p) for v in p_open.values() for p in v) / self.n_layers, 3), "p_open": p_open}
        if self.target is not None and self.steer == "lagrangian":
            extra["lambda_1"] = round(self.multipliers[0].item(), 3)
        if self.target is not None:
            extra["aim"] = round(self.heads_aimed_at(), 1)
        return extra
