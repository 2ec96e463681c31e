"""
The training loss: token cross-entropy with label smoothing (Szegedy et al. 2016), summed over
the real (non-pad) target tokens; the caller divides by the token count.

With V target words, logits x of one position, p = softmax(x), its true token t and smoothing
eps, the model is trained towards q = (1 - eps) * onehot(t) + eps / V:

    loss = -sum_i q_i log p_i = logsumexp(x) - (1 - eps) x_t - (eps / V) sum_i x_i
    d loss / d x = p - q

Written out, not F.cross_entropy(..., label_smoothing=eps): that gradient is worth seeing, and
cheaper (backward only shifts p by q; docs/performance.md). tests/test_loss.py checks both against it.
"""

import torch
from torch.autograd.function import once_differentiable


class SmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of logits (N, V) against targets (N,), rows whose
    target is ignore_id left out. Computed in fp32 at least (bf16 logits under autocast
    included); the gradient comes back in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_id: int, eps: float) -> torch.Tensor:
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))   # bf16/fp16 -> fp32
        V = x.shape[-1]
        keep = (target != ignore_id).to(x.dtype)                     # (N,) 1 = a real token
        t = target.clamp(0, V - 1)[:, None]                          # ignored rows: any valid index
        p = x.softmax(dim=-1)                                        # (N, V)
        # logsumexp(x) = x_j - log p_j for any j; the largest x_j has p_j >= 1 / V (no underflow)
        top, where = x.max(dim=-1)
        lse = top - p.gather(1, where[:, None])[:, 0].log()
        row_loss = lse - (1 - eps) * x.gather(1, t)[:, 0] - eps / V * x.sum(dim=-1)
        ctx.save_for_backward(p, t, keep)
        ctx.eps, ctx.dtype = eps, logits.dtype
        return (row_loss * keep).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        p, t, keep = ctx.saved_tensors
        eps, V = ctx.eps, p.shape[-1]
        grad = p - eps / V                                           # p - q off the true token ...
        grad.scatter_add_(1, t, grad.new_full(t.shape, -(1 - eps)))  # ... and on it
        grad.mul_((grad_out * keep)[:, None])                        # ignored rows get no gradient
        return grad.to(ctx.dtype), None, None, None


def sequence_loss(logits: torch.Tensor, tgt_out: torch.Tensor, pad_id: int, smoothing: float) -> torch.Tensor:
    """logits (B, T, V), tgt_out (B, T) -> the summed label-smoothed cross-entropy of the
    positions whose target is not pad (a scalar)."""
    return SmoothedCrossEntropy.apply(logits.flatten(0, 1), tgt_out.flatten(), pad_id, smoothing)
