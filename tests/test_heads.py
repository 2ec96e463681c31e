"""heads.py: the role measures on hand-built attention maps, and the whole-split measures on a tiny model."""
import math

import pytest
import torch

import heads
from data import Data, Split
from model_transformer import Transformer, TransformerConfig
from tokenizer import CharTokenizer

PAD, BOS, EOS = CharTokenizer.pad_id, CharTokenizer.bos_id, CharTokenizer.eos_id
TOK = CharTokenizer(list("abcdefghijkl"))
V = TOK.vocab_size


def tiny(n_head=2, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = {"src_vocab": V, "tgt_vocab": V, "pad_id": PAD, "d_model": 32, "n_head": n_head, "n_enc_layer": 2,
           "n_dec_layer": 2, "d_ff": 64, "dropout": 0.0}
    cfg.update(kw)
    return Transformer(TransformerConfig(**cfg), verbose=False).to(dtype).eval()


def toy_data(n=24, seed=0):
    """A reverse task: source = random letters, target = them reversed; train = validation."""
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(4, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    split = Split(src, [s[::-1] for s in src], [""] * n, [""] * n)
    return Data(TOK, TOK, {"train": split, "validation": split}, {})


def batches(data, batch_tokens=60):
    return list(heads.split_batches(data.splits["train"], TOK, TOK, batch_tokens))


# -----------------------------------------------------------------------------
# role measures on hand-built attention maps

def one_hot_rows(targets, S):
    """(B, 1, T, S) weights: query t of sentence b puts all its attention on key targets[b][t]."""
    return torch.nn.functional.one_hot(torch.tensor(targets), S).double()[:, None]


def test_previous_and_next_token_heads_are_positional():
    real = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])              # second sentence: 3 tokens
    prev = one_hot_rows([[0, 0, 1, 2, 3], [0, 0, 1, 0, 0]], 5)               # the first token looks at itself
    nxt = one_hot_rows([[1, 2, 3, 4, 4], [1, 2, 2, 0, 0]], 5)                # the last token looks at itself
    for w, expect in ((prev, {"prev": 1.0, "next": 0.0}), (nxt, {"prev": 0.0, "next": 1.0})):
        out = heads.positional_sums(w, real)
        for name, (hits, count) in out.items():
            assert (hits / count).item() == expect[name]
        assert out["prev"][1].item() == 4 + 2 and out["next"][1].item() == 4 + 2
    half = one_hot_rows([[0, 0, 1, 4, 3], [0, 2, 1, 0, 0]], 5)   # previous at t = 1, 2, 4; t = 2 of sentence 2
    hits, count = heads.positional_sums(half, real)["prev"]
    assert (hits / count).item() == pytest.approx(4 / 6)


def test_confidence_uniform_one_hot_and_eos_ignored():
    S = 4
    real_q = torch.tensor([[True, True, True], [True, True, False]])
    no_eos = torch.zeros(2, S, dtype=torch.bool)
    total, count = heads.confidence_sums(torch.full((2, 1, 3, S), 1 / S), real_q, no_eos)
    assert (total / count).item() == pytest.approx(1 / S) and count.item() == 5
    total, count = heads.confidence_sums(one_hot_rows([[0, 1, 2], [3, 3, 3]], S), real_q, no_eos)
    assert (total / count).item() == 1.0
    # 0.7 on <eos> (the last key), 0.2 and 0.1 elsewhere: the head's confidence is 0.2, not 0.7
    w = torch.tensor([0.2, 0.1, 0.0, 0.7]).expand(2, 1, 3, S)
    eos = torch.tensor([[False, False, False, True]] * 2)
    total, count = heads.confidence_sums(w, real_q, eos)
    assert (total / count).item() == pytest.approx(0.2)


def test_rare_token_head():
    key_freq = torch.tensor([[50, 3, 80, 0], [9, 40, 9, 0]])                 # last key: <eos>, count 0
    candidate = torch.tensor([[True, True, True, False], [True, True, True, False]])
    real_q = torch.ones(2, 3, dtype=torch.bool)
    rare = one_hot_rows([[1, 1, 0], [2, 2, 1]], 4)                           # most attention on key 1 / key 2
    hits, count = heads.rare_token_sums(rare, real_q, key_freq, candidate)
    assert (hits / count).item() == 1.0                                      # key 2 ties the rarest (9) with key 0
    frequent = one_hot_rows([[2, 2, 2], [1, 1, 1]], 4)
    on_eos = one_hot_rows([[3, 3, 3], [3, 3, 3]], 4)
    for w in (frequent, on_eos):
        assert heads.rare_token_sums(w, real_q, key_freq, candidate)[0].item() == 0
    # only real queries vote: the padded queries' attention to key 0 does not count
    real_q[0, 1:] = False
    mixed = one_hot_rows([[1, 0, 0], [1, 1, 1]], 4)
    assert heads.rare_token_sums(mixed, real_q, key_freq, candidate)[0].item() == 1


# -----------------------------------------------------------------------------
# a model over a split

def test_record_attention_shapes_and_rows():
    model = tiny(n_head=2, dec_cross_heads=[2, 0])
    src, tgt_in, _ = batches(toy_data())[0]
    maps = heads.record_attention(model, src, tgt_in)
    B, S, T = src.shape[0], src.shape[1], tgt_in.shape[1]
    assert [w.shape for w in maps["enc"]] == [(B, 2, S, S)] * 2
    assert [w.shape for w in maps["dec"]] == [(B, 2, T, T)] * 2
    assert [w.shape for w in maps["cross"]] == [(B, 2, T, S), (B, 0, T, S)]
    assert torch.allclose(maps["enc"][0].sum(-1), torch.ones(B, 2, S))
    assert (maps["cross"][0] * (src == PAD)[:, None, None, :]).sum() == 0   # padded keys get nothing
    # attention_maps records cross-attention only (self-attention then runs through sdpa: 1e-7 apart)
    assert torch.allclose(maps["cross"][0][:, 1], model.attention_maps(src, tgt_in)["layer 1 head 2"], atol=1e-6)
    assert not any(m.record_weights for layers in model.attention_modules().values() for m in layers)


def test_head_roles_do_not_depend_on_how_the_split_is_batched():
    model = tiny(n_head=2)
    data = toy_data()
    small = heads.head_roles(model, data, batch_tokens=40)
    whole = heads.head_roles(model, data, batch_tokens=10_000)               # one batch, much more padding
    for measure in ("confidence", "positional_prev", "positional_next", "positional", "rare_token"):
        for kind in heads.KINDS:
            a, b = torch.tensor(small[measure][kind]), torch.tensor(whole[measure][kind])
            assert a.shape == (2, 2)
            assert torch.allclose(a, b, atol=1e-6, equal_nan=True), (measure, kind)
    values = torch.tensor([small[m][k] for m in heads.MEASURES for k in ("enc", "dec")])
    assert ((values >= 0) & (values <= 1)).all()
    assert all(math.isnan(v) for layer in small["positional"]["cross"] for v in layer)
    assert all(math.isnan(v) for layer in small["positional_next"]["dec"] for v in layer)
    assert small["positional"]["dec"] == small["positional_prev"]["dec"]
