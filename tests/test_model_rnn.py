"""model_rnn.py: shapes, padding, cached decoding, per design; that the no-attention designs
read their source (gradients at initialisation, a copy task)."""
import pytest
import torch

from loss import sequence_loss
from model_rnn import RNNConfig, Seq2SeqRNN, reversed_order

V, PAD = 20, 0
ATTENTION = ["none", "dot", "additive"]
DESIGNS = {"sutskever": dict(attention="none"), "sutskever_reversed": dict(attention="none", reverse_source=True),
           "cho": dict(attention="none", bottleneck="cho"), "dot": dict(attention="dot"),
           "additive": dict(attention="additive")}


def tiny(attention, **kw):
    torch.manual_seed(0)
    cfg = dict(src_vocab=V, tgt_vocab=V, pad_id=PAD, emb_dim=16, hidden_size=24, n_enc_layer=2,
               n_dec_layer=2, dropout=0.0, attention=attention)
    cfg.update(kw)
    return Seq2SeqRNN(RNNConfig(**cfg), verbose=False).eval()


def design(name, **kw):
    return tiny(**DESIGNS[name], **kw)


def batch(B=3, S=7, T=6):
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, V, (B, S), generator=g), torch.randint(3, V, (B, T), generator=g)
    src[1, 4:] = PAD                                  # sentences of different lengths
    return src, tgt


@pytest.mark.parametrize("name", DESIGNS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes(name, bidirectional):
    model = design(name, bidirectional=bidirectional)
    src, tgt = batch()
    assert model(src, tgt).shape == (3, 6, V)


@pytest.mark.parametrize("name", DESIGNS)
def test_extra_padding_changes_neither_summary_nor_outputs(name):
    model = design(name, bidirectional=True)
    src, tgt = batch()
    padded = torch.cat([src, torch.full((3, 5), PAD)], dim=1)
    assert torch.allclose(model.encode(src)[4], model.encode(padded)[4], atol=1e-6)   # final-state summary
    assert torch.allclose(model(src, tgt), model(padded, tgt), atol=1e-5)


@pytest.mark.parametrize("name", DESIGNS)
def test_decode_step_equals_teacher_forced_forward(name):
    model = design(name)
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



def test_reversed_order_reverses_each_sentence_and_keeps_padding_in_place():
    order = reversed_order(torch.tensor([3, 2]), 4)
    assert order.tolist() == [[2, 1, 0, 3], [1, 0, 2, 3]]
    src = torch.tensor([[5, 6, 7, PAD], [8, 9, PAD, PAD]])
    assert src.gather(1, order).tolist() == [[7, 6, 5, PAD], [9, 8, PAD, PAD]]


def test_reverse_source_is_the_same_encoder_reading_backwards():
    src, _ = batch()
    forward, backward = design("sutskever"), design("sutskever_reversed")   # same seed, same weights
    flipped = src.gather(1, reversed_order((src != PAD).sum(1), src.shape[1]))
    assert torch.allclose(backward.encode(src)[4], forward.encode(flipped)[4], atol=1e-6)


def test_no_attention_encoder_gradient_is_not_vanishing_at_initialisation():
    """At initialisation the encoder's gradient is within a sane factor of the decoder's (Sutskever:
    it reaches the encoder only through the decoder's first state, ~10x smaller; Cho: the summary
    enters every step, about equal), and the decoder's first state depends on the sentence: with
    embeddings at the output layer's small scale (embed_scale=False) it varied 5x less."""
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(3, V, (16, 12), generator=g), torch.randint(3, V, (16, 13), generator=g)
    for name, at_least in [("sutskever", 0.03), ("cho", 0.3)]:
        model = design(name, emb_dim=32, hidden_size=64).train()
        sequence_loss(model(src, tgt[:, :-1]), tgt[:, 1:], PAD, 0.0).backward()
        norm = {side: torch.stack([p.grad.norm() for n, p in model.named_parameters() if n.startswith(side)]).norm()
                for side in ("encoder", "decoder")}
        assert norm["encoder"] > at_least * norm["decoder"], (name, norm)
        first_state = model.encode(src)[3]                                  # (B, L, H)
        assert first_state.std(dim=0).mean() > 0.03, name


@pytest.mark.parametrize("name", ["sutskever", "cho"])
def test_no_attention_model_learns_to_copy_its_source(name):
    """Random 6-token sequences: the target's language model alone predicts 1 token in 9 (chance),
    so accuracy well above that means the summary vector carries the source."""
    model = design(name, src_vocab=12, tgt_vocab=12, emb_dim=32, hidden_size=64, share_src_tgt=True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def sequences(n):
        seq = torch.randint(3, 12, (n, 6), generator=g)
        return seq, torch.cat([torch.full((n, 1), 1), seq, torch.full((n, 1), 2)], dim=1)   # <bos> seq <eos>

    for _ in range(300):
        seq, tgt = sequences(32)
        loss = sequence_loss(model(seq, tgt[:, :-1]), tgt[:, 1:], PAD, 0.0) / tgt[:, 1:].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seq, tgt = sequences(200)
    accuracy = (model.eval()(seq, tgt[:, :-2]).argmax(-1) == seq).float().mean()
    assert accuracy > 0.7, accuracy
