"""Tokenizers: the fast BPE learner against a naive reference, exact round trips, serialisation."""
from collections import Counter

import pytest
import regex
import tiktoken

import tokenizer as tk

CORPUS = [
    "the cat sat on the mat.", "the dog's bone is in the garden", "a man rides a bike down the street",
    "il gatto è sul tappeto.", "l'uomo guarda la città", "Ein Mann fährt Fahrrad. Straße!",
    "numbers 12345 and 2026-11-22", "tabs\tand  double  spaces ", "emoji 😀 and 中文字符",
] * 3


def naive_bpe(texts, n_merges):
    """Reference: recount every pair of every word after each merge (slow but obviously right)."""
    words = Counter()
    for t in texts:
        words.update(regex.findall(tk.SPLIT_PATTERN, t))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    token_bytes = [bytes([b]) for b in range(256)]
    merges = []
    while len(merges) < n_merges:
        counts = Counter()
        for w, seq in seqs.items():
            for p in zip(seq, seq[1:]):
                counts[p] += words[w]
        candidates = [(c, p) for p, c in counts.items()
                      if c >= 2 and token_bytes[p[0]] + token_bytes[p[1]] not in token_bytes]
        if not candidates:
            break
        best = min(candidates, key=lambda cp: (-cp[0], cp[1]))[1]
        merges.append(best)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        seqs = {w: tk.merge_word(s, best, 255 + len(merges)) for w, s in seqs.items()}
    return merges


def test_merge_word_docstring_example():
    assert tk.merge_word([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert tk.merge_word([1, 1, 1], (1, 1), 9) == [9, 1]


def test_fast_bpe_matches_naive_reference():
    assert tk.learn_bpe(CORPUS, 60) == naive_bpe(CORPUS, 60)


def test_bpe_stops_when_no_pair_repeats():
    merges = tk.learn_bpe(["abc"], 50)   # every pair occurs once: nothing worth merging
    assert merges == []


def test_bpe_round_trip_is_exact():
    tok = tk.BPETokenizer.train(CORPUS, 400)
    for text in CORPUS + ["unseen wörds ☃ and \n newlines", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the cat sat on the mat.")) < len("the cat sat on the mat.".encode())


def test_bpe_encoding_replays_learned_merges():
    merges = tk.learn_bpe(CORPUS, 40)
    tok = tk.BPETokenizer(merges)
    top = merges[0]
    piece = (bytes([top[0]]) + bytes([top[1]])).decode("utf-8")
    assert tok.encode(piece) == [256]     # the first merge becomes one token, id 256


def test_bpe_specials_and_vocab_size():
    tok = tk.BPETokenizer.train(CORPUS * 10, 300)
    assert tok.vocab_size <= 300
    assert {tok.pad_id, tok.bos_id, tok.eos_id} == {tok.vocab_size - 3, tok.vocab_size - 2, tok.vocab_size - 1}
    ids = tok.encode("the cat")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "the cat"
    assert tok.piece(tok.eos_id) == "<eos>"
    with pytest.raises(ValueError, match="too small"):
        tk.BPETokenizer.train(CORPUS, 100)


def test_char_tokenizer_unknown_characters():
    tok = tk.CharTokenizer.train(["abc", "aab"], 100)
    assert tok.chars[:3] == ["a", "b", "c"]           # by frequency
    assert tok.encode("abz") == [4, 5, tok.unk_id]
    assert tok.decode(tok.encode("cab")) == "cab"
    assert tok.decode(tok.encode("zab")) == "\u2047ab"
    small = tk.CharTokenizer.train(["aaab"], 5)        # vocab_size caps the character set
    assert small.vocab_size == 5 and small.encode("b") == [small.unk_id]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_state_dict_round_trip(kind):
    tok = tk.train_tokenizer(kind, CORPUS, 500)
    again = tk.tokenizer_from_state(tok.state_dict())
    for text in CORPUS:
        assert again.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size


def test_compact_tiktoken_uses_only_seen_ids():
    # a pretrained encoding stands in for gpt2 (which would need a download): our own BPE
    big = tk.BPETokenizer.train(CORPUS * 5, 800).enc
    tok = tk.CompactTiktoken.train(CORPUS[:3], 10_000, "stand-in", enc=big)
    used = {i for t in CORPUS[:3] for i in big.encode_ordinary(t)}
    assert tok.vocab_size == 4 + len(used) < big.n_vocab
    for text in CORPUS[:3]:
        assert tok.decode(tok.encode(text)) == text
    assert tk.CompactTiktoken.unk_id in tok.encode("中文")  # pieces never seen in training


def test_tiktoken_that_cannot_load_gives_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError, match="--tokenizer=bpe"):
        tk.train_tokenizer("tiktoken:gpt2", CORPUS, 1000)


def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="'bpe', 'char'"):
        tk.train_tokenizer("wordpiece", CORPUS, 1000)
