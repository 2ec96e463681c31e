"""tools/heads.py: importance against finite differences, exactly K heads kept, the role measures on
hand-built attention maps, and the whole-split measures on a tiny model."""
import math
import os

import pytest
import torch

from tools import heads
from data import Data, Split
from gates import set_head_gate
from loss import sequence_loss
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

def test_attention_weights_shapes_and_rows():
    model = tiny(n_head=2, dec_cross_heads=[2, 0])
    src, tgt_in, _ = batches(toy_data())[0]
    maps = model.attention_weights(src, tgt_in)
    assert not any(m.record_weights or m.last_weights is not None     # the modules are as they were
                   for layers in model.attention_modules().values() for m in layers)
    B, S, T = src.shape[0], src.shape[1], tgt_in.shape[1]
    assert [w.shape for w in maps["enc"]] == [(B, 2, S, S)] * 2
    assert [w.shape for w in maps["dec"]] == [(B, 2, T, T)] * 2
    assert [w.shape for w in maps["cross"]] == [(B, 2, T, S), (B, 0, T, S)]
    assert torch.allclose(maps["enc"][0].sum(-1), torch.ones(B, 2, S))
    assert (maps["cross"][0] * (src == PAD)[:, None, None, :]).sum() == 0   # padded keys get nothing
    # attention_maps records cross-attention only (self-attention then runs through sdpa: 1e-7 apart)
    assert torch.allclose(maps["cross"][0][:, 1], model.attention_maps(src, tgt_in)["layer 1 head 2"], atol=1e-6)


def test_head_roles_do_not_depend_on_how_the_split_is_batched():
    model = tiny(n_head=2)
    data = toy_data(n=16)
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


# -----------------------------------------------------------------------------
# importance

class FixedMask(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self):
        return self.values


def test_importance_equals_finite_differences_summed_per_batch():
    model = tiny(dtype=torch.float64)
    data = toy_data()
    bs = batches(data)[:2]
    before = model(*bs[0][:2])
    got = heads.head_importance(model, bs, PAD, smoothing=0.1, normalize=False)

    @torch.no_grad()
    def loss(src, tgt_in, tgt_out):
        n = (tgt_out != PAD).sum()
        return float(sequence_loss(model(src, tgt_in), tgt_out, PAD, 0.1) / n)

    eps, mixed_signs = 1e-5, 0
    for kind, layers in model.attention_modules().items():
        for i, m in enumerate(layers):
            for h in range(m.n_head):
                fd = signed = 0.0
                for b in bs:                               # central difference per batch, |.| summed
                    xi = torch.ones(m.n_head, dtype=torch.float64)
                    xi[h] = 1 + eps
                    set_head_gate(m, FixedMask(xi.clone()))
                    up = loss(*b)
                    xi[h] = 1 - eps
                    set_head_gate(m, FixedMask(xi.clone()))
                    slope = (up - loss(*b)) / (2 * eps)
                    fd, signed = fd + abs(slope), signed + slope
                set_head_gate(m, None)
                assert got[kind][i][h].item() == pytest.approx(fd, rel=1e-6, abs=1e-9), (kind, i, h)
                mixed_signs += abs(signed) < 0.9 * fd
    assert mixed_signs > 0     # the batches disagree for some head: |sum| instead of sum |.| would fail
    # the masks are gone and the model computes what it computed before
    assert all(getattr(m, "head_gate", None) is None for layers in model.attention_modules().values() for m in layers)
    assert torch.equal(model(*bs[0][:2]), before) and not model.training
    assert all(p.grad is None for p in model.parameters())
    # per-layer l2 normalisation
    norm = heads.head_importance(model, bs, PAD, smoothing=0.1)
    for kind in got:
        for raw, scaled in zip(got[kind], norm[kind]):
            assert scaled.norm().item() == pytest.approx(1.0)
            assert torch.allclose(scaled * raw.norm(), raw)


def test_importance_of_a_pruned_model_and_a_gated_one():
    model = tiny(n_head=2, enc_self_heads=[0, 2])          # encoder layer 0 lost every head
    bs = batches(toy_data())[:1]
    got = heads.head_importance(model, bs, PAD, kinds=["enc"])
    assert got["enc"][0].shape == (0,) and got["enc"][1].shape == (2,)
    set_head_gate(model.attention_modules()["enc"][1], FixedMask(torch.ones(2)))
    with pytest.raises(ValueError, match="enc layer 1"):
        heads.head_importance(model, bs, PAD)


# -----------------------------------------------------------------------------
# keeping K heads

N_HEADS = {"enc": [4, 4], "dec": [4, 4], "cross": [4, 4]}


def n_kept(keep, kinds):
    return sum(len(k) for kind in kinds for k in keep[kind])


def test_top_k_keeps_the_k_most_important_and_ties_deterministically():
    importance = {"enc": [torch.tensor([0.9, 0.1, 0.5, 0.5]), torch.tensor([0.3, 0.8, 0.5, 0.2])],
                  "cross": [torch.tensor([0.7, 0.0, 0.0, 0.0]), torch.tensor([0.5, 0.1, 0.1, 0.6])]}
    keep = heads.top_k_heads(N_HEADS, importance, 4)
    assert keep == {"enc": [[0], [1]], "dec": [[0, 1, 2, 3], [0, 1, 2, 3]], "cross": [[0], [3]]}
    # 0.5 appears four times: enc 0 heads 2, 3, enc 1 head 2, cross 1 head 0, taken in that order
    assert heads.top_k_heads(N_HEADS, importance, 5)["enc"] == [[0, 2], [1]]
    keep = heads.top_k_heads(N_HEADS, importance, 7)
    assert keep["enc"] == [[0, 2, 3], [1, 2]] and keep["cross"] == [[0], [3]]
    assert heads.top_k_heads(N_HEADS, importance, 8)["cross"] == [[0], [0, 3]]
    for k in range(17):
        assert n_kept(heads.top_k_heads(N_HEADS, importance, k), ["enc", "cross"]) == k
    with pytest.raises(ValueError, match="between 0 and 16"):
        heads.top_k_heads(N_HEADS, importance, 17)


def test_random_heads_keeps_k_uniformly_and_reproducibly():
    kinds = ["enc", "dec"]
    for k in (0, 3, 16):
        keep = heads.random_heads(N_HEADS, kinds, k, seed=0)
        assert n_kept(keep, kinds) == k and keep["cross"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert heads.random_heads(N_HEADS, kinds, 5, seed=1) == heads.random_heads(N_HEADS, kinds, 5, seed=1)
    assert heads.random_heads(N_HEADS, kinds, 5, seed=1) != heads.random_heads(N_HEADS, kinds, 5, seed=2)
    # every head is kept in about k / N of the draws (4 of 16 here)
    counts = torch.zeros(2, 2, 4)
    for seed in range(400):
        keep = heads.random_heads(N_HEADS, kinds, 4, seed)
        for j, kind in enumerate(kinds):
            for i, kept in enumerate(keep[kind]):
                counts[j, i, kept] += 1
    assert ((counts / 400 - 0.25).abs() < 0.1).all()


def test_gate_values_make_prune_heads_keep_exactly_the_keep_set():
    import prune
    model = tiny(n_head=4)
    n_heads = heads.head_counts(model)
    keep = heads.random_heads(n_heads, ["enc", "cross"], 5, seed=3)
    pruned, kept = prune.prune_heads(model, heads.gate_values(n_heads, keep))
    assert kept == keep
    assert sum(pruned.cfg.enc_self_heads) + sum(pruned.cfg.dec_cross_heads) == 5
    assert pruned.cfg.dec_self_heads == [4, 4]


# -----------------------------------------------------------------------------
# what the kept heads do, and the figure

def test_kept_vs_removed_and_the_figure(tmp_path):
    roles = {m: {"enc": [[0.9, 0.1], [0.5, 0.3]], "dec": [[1.0, 1.0], [1.0, 1.0]],
                 "cross": [[math.nan, math.nan], [math.nan, math.nan]] if m == "positional" else [[0.2, 0.4], [0, 0]]}
             for m in ("confidence", "positional", "rare_token")}
    n_heads = {"enc": [2, 2], "dec": [2, 2], "cross": [2, 2]}
    keep = {"enc": [[0], [0, 1]], "dec": [[0, 1], [0, 1]], "cross": [[1], []]}
    means = heads.kept_vs_removed(roles, keep, ["enc", "cross"])
    assert means["confidence"]["kept"] == pytest.approx((0.9 + 0.5 + 0.3 + 0.4) / 4)
    assert means["confidence"]["removed"] == pytest.approx((0.1 + 0.2 + 0 + 0) / 4)
    assert means["positional"]["kept"] == pytest.approx((0.9 + 0.5 + 0.3) / 3)   # cross-attention: NaN, left out
    importance = {"enc": [torch.tensor([0.6, 0.8]), torch.tensor([1.0, 0.0])]}
    kept = {"L0": keep, "random seed 0": heads.random_heads(n_heads, ["enc", "cross"], 3, seed=0)}
    path = heads.plot_heads(str(tmp_path / "figs" / "heads.png"), roles, importance, kept)
    assert path == str(tmp_path / "figs" / "heads.png") and os.path.getsize(path) > 10_000
