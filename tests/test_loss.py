"""loss.py: the written-out label-smoothed cross-entropy against torch's F.cross_entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import SmoothedCrossEntropy, sequence_loss

PAD = 0


def logits_and_targets(B=3, T=5, V=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    tgt = torch.randint(1, V, (B, T), generator=g)
    tgt[0, 3:] = PAD                                     # padding at the end of a row, as in a batch
    tgt[-1, 2] = PAD
    return logits, tgt


def reference(logits, tgt, eps):
    return F.cross_entropy(logits.double().flatten(0, 1), tgt.flatten(), ignore_index=PAD,
                           label_smoothing=eps, reduction="sum")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_value_and_gradient_equal_torch_cross_entropy(eps):
    logits, tgt = logits_and_targets()
    ours = sequence_loss(logits, tgt, PAD, eps)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = reference(logits, tgt, eps)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)
    assert (g_ours[tgt == PAD] == 0).all()               # padding positions get no gradient
    assert ours.item() > 0


def test_gradcheck():
    logits, tgt = logits_and_targets(B=2, T=3, V=7)
    assert torch.autograd.gradcheck(lambda x: SmoothedCrossEntropy.apply(x.flatten(0, 1), tgt.flatten(), PAD, 0.1),
                                    (logits,))


def test_bf16_logits_are_computed_in_fp32_and_get_a_bf16_gradient():
    logits, tgt = logits_and_targets(V=6000, dtype=torch.bfloat16)
    ours = sequence_loss(logits, tgt, PAD, 0.1)
    (g,) = torch.autograd.grad(ours, logits)
    ref = reference(logits.detach().float(), tgt, 0.1)   # the same bf16 numbers, in fp64
    assert ours.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_large_logits_do_not_overflow():
    logits, tgt = logits_and_targets(dtype=torch.float32)
    big = (logits.detach() * 1000).requires_grad_()     # exp(x) alone would overflow fp32
    ours = sequence_loss(big, tgt, PAD, 0.1)
    assert math.isfinite(ours.item())
    assert ours.item() == pytest.approx(reference(big.detach(), tgt, 0.1).item(), rel=1e-5)


def test_uniform_logits_give_ln_v_per_token():
    tgt = torch.tensor([[3, 4, PAD]])
    assert sequence_loss(torch.zeros(1, 3, 50), tgt, PAD, 0.1).item() == pytest.approx(2 * math.log(50), rel=1e-6)


def test_all_padding_gives_zero():
    assert sequence_loss(torch.randn(2, 3, 9), torch.full((2, 3), PAD), PAD, 0.1).item() == 0.0
