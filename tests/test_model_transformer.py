"""model_transformer.py: masks, caching, initialisation, per-head gates, attention without heads."""
import math

import pytest
import torch
import torch.nn.functional as F

from decoding import greedy
from tools.reference import greedy_uncached
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


def test_a_head_gate_scales_each_head_and_comes_off_again():
    from gates import set_head_gate
    model = tiny()
    src, tgt = batch()
    attn = model.attention_modules()["enc"][0]
    base = model(src, tgt)
    set_head_gate(attn, lambda: torch.ones(2))
    assert torch.allclose(model(src, tgt), base, atol=1e-6)          # all-ones gate = no gate
    set_head_gate(attn, lambda: torch.tensor([1.0, 0.0]))            # replaces the first gate
    gated = model(src, tgt)
    assert not torch.allclose(gated, base, atol=1e-4)
    # the gate zeroes head 1's output: the same as zeroing that head's columns of out_proj
    plain = tiny()
    with torch.no_grad():
        plain.attention_modules()["enc"][0].out_proj.weight[:, 16:] = 0
    assert torch.allclose(gated, plain(src, tgt), atol=1e-5)
    set_head_gate(attn, None)
    assert torch.equal(model(src, tgt), base) and attn.head_gate is None


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_an_attention_without_heads_adds_its_output_bias_alone(impl):
    model = tiny(enc_self_heads=[0, 2], dec_self_heads=[2, 0], dec_cross_heads=[2, 0], attn_impl=impl)
    src, tgt = batch()
    assert torch.allclose(model(src, tgt), tiny(enc_self_heads=[0, 2], dec_self_heads=[2, 0], dec_cross_heads=[2, 0],
                                                attn_impl="math")(src, tgt), atol=1e-5)
    attn = model.encoder[0].self_attn
    with torch.no_grad():
        attn.out_proj.bias.normal_()
    h = torch.randn(3, 7, 32)
    assert torch.equal(attn.self_attention(h), attn.out_proj.bias.expand(3, 7, 32))
    weights = model.attention_weights(src, tgt)
    assert weights["enc"][0].shape == (3, 0, 7, 7) and weights["cross"][1].shape == (3, 0, 6, 7)
    assert len(model.attention_maps(src, tgt)) == 2                  # only decoder layer 0's two heads
    model.train()
    model(src, tgt).sum().backward()                                 # trains: the gradients are finite
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_an_attention_without_heads_never_calls_the_fused_kernel(monkeypatch):
    """On CUDA, PyTorch builds from before 2026 crash in flash attention's check of H = 0."""
    import model_transformer
    sdpa = F.scaled_dot_product_attention

    def no_empty_heads(q, *args, **kwargs):
        assert q.shape[1] > 0, "SDPA called with H = 0"
        return sdpa(q, *args, **kwargs)
    monkeypatch.setattr(model_transformer.F, "scaled_dot_product_attention", no_empty_heads)
    model = tiny(enc_self_heads=[0, 2], dec_self_heads=[2, 0], dec_cross_heads=[0, 2], attn_impl="sdpa")
    src, tgt = batch()
    src[1, 5:] = PAD
    model(src, tgt).sum().backward()
    assert greedy(model, src, BOS, EOS, PAD, 8)[0].shape[0] == 3


def test_tied_and_shared_embeddings():
    model = tiny(share_src_tgt=True)
    assert model.out_proj.weight is model.tgt_embed.weight is model.src_embed.weight
    untied = tiny(tie_output=False)
    assert untied.num_params() > model.num_params()


@pytest.mark.parametrize("where", ["attn_dropout", "ff_dropout"])
def test_attention_and_feed_forward_dropout_are_their_own_knobs(where):
    src, tgt = batch()
    quiet = tiny(dropout=0.0).train()
    assert torch.equal(quiet(src, tgt), quiet(src, tgt))                 # no dropout anywhere: deterministic
    noisy = tiny(dropout=0.0, **{where: 0.5}).train()
    assert not torch.equal(noisy(src, tgt), noisy(src, tgt))            # only this one drops
    layer = noisy.decoder[0]
    drops = {"attn_dropout": (layer.self_attn.dropout.p, layer.cross_attn.dropout.p), "ff_dropout": (layer.ff.dropout.p,)}
    assert all(p == 0.5 for p in drops[where]) and layer.res_ff.dropout.p == 0.0 and noisy.embed_dropout.p == 0.0
