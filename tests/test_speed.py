"""The speed tricks compute what the plain code computes (values and gradients): speed.py's
FastDropout (it keeps the state dict and leaves decoding as it was) and the attention's q/k/v
projections as one matrix product (model_transformer.MultiHeadAttention.project)."""
import copy

import pytest
import torch

from decoding import greedy
from model_transformer import MultiHeadAttention, Transformer, TransformerConfig
from speed import FastDropout, fast_dropout, speed_up

V, PAD, BOS, EOS = 30, 0, 1, 2


def plain_and_fast(**kw):
    torch.manual_seed(0)
    cfg = dict(src_vocab=V, tgt_vocab=V, pad_id=PAD, d_model=32, n_head=4, n_enc_layer=2, n_dec_layer=2, d_ff=64,
               dropout=0.1, attn_dropout=0.1, ff_dropout=0.1, attn_impl="math")
    cfg.update(kw)
    plain = Transformer(TransformerConfig(**cfg), verbose=False)
    return plain, speed_up(copy.deepcopy(plain))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(3, V, (4, 9), generator=g), torch.randint(3, V, (4, 8), generator=g)
    src[1, 6:] = PAD
    return src, tgt


def test_fast_dropout_keeps_the_semantics_of_dropout():
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = fast_dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002              # each element dropped with p = 0.1
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))  # survivors scaled by 1 / (1 - p)
    assert abs(y.mean().item() - 1.0) < 0.003                          # so the expectation is unchanged
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                             # the gradient goes through the same mask
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, 0.1, training=True), y)         # seeded: reproducible
    assert fast_dropout(x, 0.1, training=False) is x and fast_dropout(x, 0.0, training=True) is x
    rows = fast_dropout(torch.ones(7, 3), 0.5, training=True)          # sizes not divisible by 4
    assert rows.shape == (7, 3) and set(rows.unique().tolist()) <= {0.0, 2.0}


def test_speed_up_swaps_every_module_and_keeps_the_state_dict():
    plain, fast = plain_and_fast()
    kinds = {type(m) for m in fast.modules()}
    assert torch.nn.Dropout not in kinds and FastDropout in kinds
    assert kinds - {FastDropout} == {type(m) for m in plain.modules()} - {torch.nn.Dropout}   # nothing else changes
    assert sum(isinstance(m, FastDropout) for m in fast.modules()) == sum(
        isinstance(m, torch.nn.Dropout) for m in plain.modules())
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(v, fast.state_dict()[k]) for k, v in plain.state_dict().items())
    assert speed_up(fast) is fast                                        # twice = once


def separate_products(self, x, projections):
    """The plain code the stacked product stands in for: one matrix product per projection."""
    return [self.split_heads(proj(x)) for proj in projections]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_projections_give_the_plain_loss_and_gradients(dtype):
    stacked, separate = plain_and_fast(dropout=0.0, attn_dropout=0.0, ff_dropout=0.0)
    src, tgt = batch()
    calls = []
    for m in separate.modules():
        if isinstance(m, MultiHeadAttention):        # this instance's projections one by one
            m.project = lambda x, projections, m=m: calls.append(1) or separate_products(m, x, projections)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)   # bf16: 8 bits
    outs = []
    for model in (stacked, separate):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(src, tgt).float()
        logits.logsumexp(-1).sum().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = outs
    assert calls and torch.allclose(a, b, **tol)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], **tol), name


def test_a_fast_model_decodes_what_the_plain_one_decodes():
    plain, fast = plain_and_fast()
    src, _ = batch()
    assert torch.equal(greedy(plain.eval(), src, BOS, EOS, PAD, 12)[0], greedy(fast.eval(), src, BOS, EOS, PAD, 12)[0])


def test_fast_dropout_in_the_model_drops_at_the_same_rate():
    plain, fast = plain_and_fast(dropout=0.3, attn_dropout=0.0, ff_dropout=0.0)
    x = torch.ones(200, 200)
    drop = fast.embed_dropout.train()
    assert isinstance(drop, FastDropout) and abs((drop(x) == 0).float().mean().item() - 0.3) < 0.01
    src, tgt = batch()
    fast.train()
    assert not torch.equal(fast(src, tgt), fast(src, tgt))            # dropout is on in training
    fast.eval()
    assert torch.allclose(fast(src, tgt), plain.eval()(src, tgt), atol=1e-6)   # and off in evaluation


def test_a_model_built_for_speed_leaves_cudnn_out_of_gpu_attention():
    torch.backends.cuda.enable_cudnn_sdp(True)
    plain_and_fast()
    assert not torch.backends.cuda.cudnn_sdp_enabled()      # flash / memory-efficient: no plan per shape
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
