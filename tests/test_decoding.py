"""decoding.py: greedy and beam search on both models, the stopping rule, input order."""
import itertools

import pytest
import torch

from decoding import beam_search, greedy, length_penalty, select_rows, translate_nbest
from tools.reference import greedy_uncached
from model_rnn import RNNConfig, Seq2SeqRNN
from model_transformer import Transformer, TransformerConfig

PAD, BOS, EOS = 0, 1, 2


def tiny(kind: str, V: int = 12):
    torch.manual_seed(0)
    if kind == "transformer":
        cfg = TransformerConfig(src_vocab=V, tgt_vocab=V, pad_id=PAD, d_model=32, n_head=4, n_enc_layer=2,
                                n_dec_layer=2, d_ff=64, dropout=0.0)
        return Transformer(cfg, verbose=False).eval()
    cfg = RNNConfig(src_vocab=V, tgt_vocab=V, pad_id=PAD, emb_dim=16, hidden_size=24, attention=kind, dropout=0.0)
    return Seq2SeqRNN(cfg, verbose=False).eval()


def sources(V: int = 12, B: int = 5, S: int = 8):
    src = torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(2))
    src[1, S // 2:] = PAD                             # sentences of different lengths
    src[-1, 2:] = PAD
    return src


MODELS = ["transformer", "none", "dot", "additive"]


@pytest.mark.parametrize("kind", MODELS)
def test_cached_greedy_equals_uncached(kind):
    model, src = tiny(kind), sources()
    cached, _ = greedy(model, src, BOS, EOS, PAD, 10)
    assert torch.equal(cached, greedy_uncached(model, src, BOS, EOS, PAD, 10))


def cut(ids: list[int]) -> list[int]:
    return ids[:ids.index(EOS)] if EOS in ids else ids


@pytest.mark.parametrize("kind", MODELS)
def test_beam_one_without_length_penalty_is_greedy(kind):
    model, src = tiny(kind), sources()
    hyps, scores = greedy(model, src, BOS, EOS, PAD, 10)
    found = beam_search(model, src, BOS, EOS, 10, beam=1, alpha=0.0)
    for b in range(src.shape[0]):
        (ids, score), = found[b]
        assert ids == cut(hyps[b].tolist())
        assert score == pytest.approx(scores[b].item(), abs=1e-4)


def sequence_logprob(model, src_row: torch.Tensor, ids: list[int]) -> float:
    """log P(ids | src) by one teacher-forced forward pass."""
    tgt_in = torch.tensor([[BOS] + ids[:-1]])
    logp = model(src_row[None], tgt_in).float().log_softmax(-1)[0]
    return sum(logp[t, i].item() for t, i in enumerate(ids))


@pytest.mark.parametrize("kind", ["transformer", "dot"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_exact_best_sequence(kind, alpha):
    """With more beams than there are extensions of all live prefixes nothing is pruned, so the
    result must be the best of all sequences by brute force: only the stopping rule can go wrong."""
    V, max_len = 5, 4
    model, src = tiny(kind, V), sources(V, B=2, S=4)
    found = beam_search(model, src, BOS, EOS, max_len, beam=V ** max_len, alpha=alpha)
    for b in range(2):
        candidates = [list(seq) for n in range(max_len + 1) for seq in itertools.product(range(V), repeat=n)
                      if EOS not in seq]
        candidates = [c + [EOS] for c in candidates if len(c) < max_len] + [c for c in candidates if len(c) == max_len]
        ranked = max(candidates, key=lambda c: sequence_logprob(model, src[b], c) / length_penalty(len(c), alpha))
        (ids, score), = found[b]
        assert ids == cut(ranked)
        assert score == pytest.approx(sequence_logprob(model, src[b], ranked), abs=1e-4)


class Scripted(torch.nn.Module):
    """A fake model with fixed next-token probabilities, tokens pad bos eos a:
    first step eos 0.55 / a 0.45; after 'a': a 0.9 (then eos 0.99), eos 0.1."""

    def encode(self, src):
        return src

    def decode_step(self, y, memory, cache):
        n = torch.zeros_like(y) if cache is None else cache["n"] + 1
        table = {0: [0, 0, .55, .45], 1: [0, 0, .1, .9], 2: [0, 0, .99, .01]}
        probs = torch.tensor([table[min(int(i), 2)] for i in n]) + 1e-9
        return probs.log(), {"n": n}


def test_stopping_rule_lets_a_longer_hypothesis_win_under_length_penalty():
    # alpha = 0: the one-token <eos> (log .55) beats 'a a <eos>' (log .45*.9*.99): stop at once
    src = torch.zeros(1, 1, dtype=torch.long)
    (ids, score), = beam_search(Scripted(), src, BOS, EOS, 10, beam=2, alpha=0.0)[0]
    assert ids == [] and score == pytest.approx(torch.tensor(.55).log().item(), abs=1e-6)
    # alpha = 2: the top beam ends first, but 'a a <eos>' ranks higher: -0.914 / (8/6)^2 > -0.598
    (ids, _), = beam_search(Scripted(), src, BOS, EOS, 10, beam=2, alpha=2.0)[0]
    assert ids == [3, 3]


def test_nbest_is_sorted_and_distinct():
    model, src = tiny("transformer"), sources()
    for hyps in beam_search(model, src, BOS, EOS, 10, beam=4, alpha=0.6, nbest=3):
        assert len(hyps) == 3
        ranked = [s / length_penalty(len(ids) + 1, 0.6) for ids, s in hyps]
        assert ranked == sorted(ranked, reverse=True)
        assert len({tuple(ids) for ids, _ in hyps}) == 3


def test_select_rows_reaches_every_tensor():
    tree = ({"k": torch.arange(3)}, [torch.arange(3) * 2, None], 7)
    out = select_rows(tree, torch.tensor([2, 0]))
    assert out[0]["k"].tolist() == [2, 0] and out[1][0].tolist() == [4, 0] and out[1][1] is None and out[2] == 7


class CharTok:
    """Digits as tokens 3..12: enough of a tokenizer for translate()."""
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text):
        return [3 + int(c) for c in text if c.isdigit()]

    def decode(self, ids):
        return "".join(str(i - 3) for i in ids if i >= 3)


class Echo(torch.nn.Module):
    """A fake model that copies its source (which ends in <eos>): the output shows where each
    translation came from, whatever the batching."""

    def encode(self, src):
        return src

    def decode_step(self, y, memory, cache):
        n = torch.zeros_like(y) if cache is None else cache["n"] + 1
        logits = torch.full((y.shape[0], 13), -10.0)
        logits[torch.arange(y.shape[0]), memory[torch.arange(y.shape[0]), n.clamp(max=memory.shape[1] - 1)]] = 0.0
        return logits, {"n": n}


@pytest.mark.parametrize("beam", [1, 3])
def test_translate_keeps_input_order_and_empty_lines(beam):
    lines = ["1234567", "", "12", "98765432109876", "  ", "5", "31"]
    out = translate_nbest(Echo(), CharTok(), CharTok(), lines, beam=beam, batch_size=2)
    assert [hyps[0][0] for hyps in out] == ["1234567", "", "12", "98765432109876", "", "5", "31"]
    assert out[1] == [("", 0.0)] and out[4] == [("", 0.0)]


def test_long_input_is_truncated_with_a_warning_naming_the_line():
    model, tok, warnings = tiny("transformer", V=13), CharTok(), []
    translate_nbest(model, tok, tok, ["12", "1" * 30], max_src_len=10, warn=warnings.append)
    assert len(warnings) == 1 and "line 2" in warnings[0] and "30 tokens" in warnings[0]


def test_lower_cased_bleu_and_the_paired_bootstrap_test():
    from decoding import score
    from tools.compare import paired_bootstrap
    refs = [f"Sentence number {i} is about a Dog and {i % 7} cats" for i in range(200)]
    lowered = score([r.lower() for r in refs], refs)
    assert lowered["bleu_lc"] == pytest.approx(100) and lowered["bleu"] < 60
    assert "case:lc" in lowered["bleu_lc_signature"] and "case:mixed" in lowered["bleu_signature"]
    half_wrong = [r if i % 2 else "nothing of the kind" for i, r in enumerate(refs)]
    test = paired_bootstrap(half_wrong, refs, refs)
    assert test["difference"] > 30 and test["p_value"] < 0.01 and "bs:1000" in test["signature"]
    one_word = refs[:-1] + [refs[-1].replace("Dog", "cow")]     # one word of 2,400: chance could do that
    assert paired_bootstrap(refs, one_word, refs)["p_value"] > 0.05
    assert paired_bootstrap(refs, refs, refs)["p_value"] == 1.0  # identical outputs: no evidence of a difference
