"""model_rnn.py: shapes, padding, cached decoding, per attention type."""
import pytest
import torch

from model_rnn import RNNConfig, Seq2SeqRNN

V, PAD = 20, 0
ATTENTION = ["none", "dot", "additive"]


def tiny(attention, **kw):
    torch.manual_seed(0)
    cfg = dict(src_vocab=V, tgt_vocab=V, pad_id=PAD, emb_dim=16, hidden_size=24, n_enc_layer=2,
               n_dec_layer=2, dropout=0.0, attention=attention)
    cfg.update(kw)
    return Seq2SeqRNN(RNNConfig(**cfg), verbose=False).eval()


def batch(B=3, S=7, T=6):
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, V, (B, S), generator=g), torch.randint(3, V, (B, T), generator=g)
    src[1, 4:] = PAD                                  # sentences of different lengths
    return src, tgt


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes(attention, bidirectional):
    model = tiny(attention, bidirectional=bidirectional)
    src, tgt = batch()
    assert model(src, tgt).shape == (3, 6, V)


@pytest.mark.parametrize("attention", ATTENTION)
def test_extra_padding_changes_neither_summary_nor_outputs(attention):
    model = tiny(attention, bidirectional=True)
    src, tgt = batch()
    padded = torch.cat([src, torch.full((3, 5), PAD)], dim=1)
    assert torch.allclose(model.encode(src)[3], model.encode(padded)[3], atol=1e-6)   # final-state summary
    assert torch.allclose(model(src, tgt), model(padded, tgt), atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION)
def test_decode_step_equals_teacher_forced_forward(attention):
    model = tiny(attention)
    src, tgt = batch()
    full = model(src, tgt)
    memory, cache = model.encode(src), None
    for t in range(tgt.shape[1]):
        step, cache = model.decode_step(tgt[:, t], memory, cache)
        assert torch.allclose(step, full[:, t], atol=1e-5)


@pytest.mark.parametrize("attention", ["dot", "additive"])
def test_padding_gets_no_attention(attention):
    model = tiny(attention)
    src, tgt = batch()
    weights = model.attention_maps(src, tgt)["attention"]             # (B, T, S), every target step
    assert weights.shape == (3, 6, src.shape[1])
    assert (weights[1, :, 4:] == 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(3, 6))
    assert tiny("none").attention_maps(src, tgt) == {}


def test_teacher_forcing_below_one_feeds_predictions():
    model = tiny("dot", teacher_forcing=0.0).train()
    src, tgt = batch()
    changed = tgt.clone()
    changed[:, 2:] = 3                      # with no teacher forcing, later true tokens are never read
    torch.manual_seed(0)
    a = model(src, tgt)
    torch.manual_seed(0)
    b = model(src, changed)
    assert torch.allclose(a, b)

