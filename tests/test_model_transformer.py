"""model_transformer.py: masks, caching, initialisation, per-head multipliers."""
import math

import pytest
import torch
import torch.nn.functional as F

from decoding import greedy, greedy_uncached
from model_transformer import Transformer, TransformerConfig

V, PAD, BOS, EOS = 20, 0, 1, 2


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(src_vocab=V, tgt_vocab=V, pad_id=PAD, d_model=32, n_head=2, n_enc_layer=2, n_dec_layer=2,
               d_ff=64, dropout=0.0, attn_dropout=0.0, ff_dropout=0.0)
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg), verbose=False).eval()


def batch(B=3, S=7, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, S), generator=g), torch.randint(3, V, (B, T), generator=g)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_causality_future_tokens_do_not_change_earlier_logits(impl, pre_norm):
    model = tiny(attn_impl=impl, pre_norm=pre_norm)
    src, tgt = batch()
    logits = model(src, tgt)
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] + 1 - 3) % (V - 3) + 3
    logits2 = model(src, changed)
    assert torch.allclose(logits[:, :4], logits2[:, :4], atol=1e-5)      # positions 0..3 never see token 4
    assert not torch.allclose(logits[:, 4], logits2[:, 4], atol=1e-3)    # position 4 does


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_extra_padding_changes_no_output(impl):
    model = tiny(attn_impl=impl)
    src, tgt = batch()
    padded_src = torch.cat([src, torch.full((3, 5), PAD)], dim=1)
    padded_tgt = torch.cat([tgt, torch.full((3, 4), PAD)], dim=1)
    assert torch.allclose(model(src, tgt), model(padded_src, padded_tgt)[:, :tgt.shape[1]], atol=1e-5)


def test_sdpa_and_math_paths_agree():
    src, tgt = batch()
    assert torch.allclose(tiny(attn_impl="sdpa")(src, tgt), tiny(attn_impl="math")(src, tgt), atol=1e-5)


def test_attention_auto_is_the_explicit_softmax_on_a_cpu(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    src, tgt = batch()
    auto = tiny(attn_impl="auto")(src, tgt)
    assert not calls                                  # 'auto' on a CPU: math (SDPA's backward was slower here)
    assert torch.allclose(auto, tiny(attn_impl="sdpa")(src, tgt), atol=1e-5) and calls


def test_decode_step_with_cache_equals_full_forward():
    model = tiny()
    src, tgt = batch()
    full = model(src, tgt)                                            # (B, T, V)
    memory, cache = model.encode(src), None
    for t in range(tgt.shape[1]):
        step, cache = model.decode_step(tgt[:, t], memory, cache)
        assert torch.allclose(step, full[:, t], atol=1e-5)


def test_cached_greedy_equals_uncached():
    model = tiny()
    src, _ = batch(B=5, S=9)
    src[1, 6:] = PAD
    a, _ = greedy(model, src, BOS, EOS, PAD, 12)
    b = greedy_uncached(model, src, BOS, EOS, PAD, 12)
    assert torch.equal(a, b)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_initial_loss_close_to_ln_vocab(pre_norm):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab=8000, tgt_vocab=8000, pad_id=0, d_model=64, n_head=4,
                                          n_enc_layer=2, n_dec_layer=2, d_ff=128, pre_norm=pre_norm),
                        verbose=False)
    src, tgt = torch.randint(3, 8000, (8, 20)), torch.randint(3, 8000, (8, 21))
    loss = F.cross_entropy(model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten())
    assert abs(loss.item() - math.log(8000)) / math.log(8000) < 0.10


def test_head_gate_scales_each_head():
    model = tiny()
    src, tgt = batch()
    attn = model.attention_modules()["enc"][0]
    base = model(src, tgt)
    attn.head_gate = lambda: torch.ones(2)
    assert torch.allclose(model(src, tgt), base, atol=1e-6)          # all-ones gate = no gate
    attn.head_gate = lambda: torch.tensor([1.0, 0.0])
    assert not torch.allclose(model(src, tgt), base, atol=1e-4)


def test_tied_and_shared_embeddings():
    model = tiny(share_src_tgt=True)
    assert model.out_proj.weight is model.tgt_embed.weight is model.src_embed.weight
    untied = tiny(tie_output=False)
    assert untied.num_params() > model.num_params()


def test_cheap_dropout_keeps_the_semantics_of_dropout():
    from model_transformer import dropout
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002              # each element dropped with p = 0.1
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))  # survivors scaled by 1 / (1 - p)
    assert abs(y.mean().item() - 1.0) < 0.003                          # so the expectation is unchanged
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                             # the gradient goes through the same mask
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, training=True), y)              # seeded: reproducible
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    rows = dropout(torch.ones(7, 3), 0.5, training=True)               # sizes not divisible by 4
    assert rows.shape == (7, 3) and set(rows.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("where", ["attn_dropout", "ff_dropout"])
def test_attention_and_feed_forward_dropout_are_their_own_knobs(where):
    src, tgt = batch()
    quiet = tiny(dropout=0.0).train()
    assert torch.equal(quiet(src, tgt), quiet(src, tgt))                 # no dropout anywhere: deterministic
    noisy = tiny(dropout=0.0, **{where: 0.5}).train()
    assert not torch.equal(noisy(src, tgt), noisy(src, tgt))            # only this one drops
    layer = noisy.decoder[0]
    drops = {"attn_dropout": (layer.self_attn.dropout, layer.cross_attn.dropout), "ff_dropout": (layer.ff.dropout.p,)}
    assert all(p == 0.5 for p in drops[where]) and layer.res_ff.dropout.p == 0.0 and noisy.embed_dropout.p == 0.0
