"""
Tokenizers: turn sentences into integer ids and back.

- `bpe` (default): byte-level BPE (Sennrich et al. 2016, on bytes as in GPT-2) learned from
  the training split, then handed to tiktoken as a custom `tiktoken.Encoding` so encoding is
  fast (Rust) and decoding is exact. Learning never downloads anything.
- `char`: one id per character seen in training, `<unk>` for the rest (classic char seq2seq).
- `tiktoken:<name>` (e.g. `tiktoken:gpt2`): a pretrained tiktoken encoding, compacted to the
  ids the corpus uses so the embedding is not 50k rows. Needs that encoding cached locally.

Every tokenizer has pad/bos/eos ids and serialises to a plain dict (`state_dict()`) that a
checkpoint stores and `tokenizer_from_state` rebuilds. Leaves out: sentencepiece-style
unigram models, normalisation (text is kept exactly as given), dropout/BPE sampling.
"""

import heapq
from collections import Counter, defaultdict

import regex
import tiktoken

# GPT-2's pre-tokenisation: merges never cross these pieces (a word keeps its leading space).
# "the cat's hat" -> ["the", " cat", "'s", " hat"]
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# -----------------------------------------------------------------------------
# learning byte-level BPE merges

def merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `word`: ([1, 2, 3, 1, 2], (1, 2), 9) -> [9, 3, 9]."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_bpe(texts: list[str], n_merges: int, pattern: str = SPLIT_PATTERN) -> list[tuple[int, int]]:
    """Learn up to `n_merges` byte-pair merges; merge k creates token id 256 + k.

    The naive loop (recount every pair of every sentence after each merge) is far too slow
    in Python. Instead:
      1. count each distinct pre-tokenised word once, with its frequency;
      2. keep pair counts and, per pair, the set of words that contain it;
      3. after a merge, update only the words that contained the merged pair;
      4. find the most frequent pair with a max-heap whose stale entries are skipped.
    Ties go to the smallest pair ids, so the result is deterministic.
    """
    split = regex.compile(pattern)
    word_freq: Counter = Counter()
    for text in texts:
        word_freq.update(split.findall(text))
    words = [list(w.encode("utf-8")) for w in word_freq]
    freqs = list(word_freq.values())

    pair_freq: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_freq[pair] += freqs[i]
            pair_words[pair].add(i)
    heap = [(-f, pair) for pair, f in pair_freq.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([b]) for b in range(256)]
    known = set(token_bytes)
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg_freq, pair = heapq.heappop(heap)
        if pair_freq.get(pair, 0) != -neg_freq:
            continue                      # stale heap entry: the count changed since it was pushed
        if -neg_freq < 2:
            break                         # only pairs seen once are left: merging them learns nothing
        merged_bytes = token_bytes[pair[0]] + token_bytes[pair[1]]
        del pair_freq[pair]
        if merged_bytes in known:
            continue                      # e.g. ("a", "bc") after ("ab", "c"): the token exists already
        new_id = 256 + len(merges)
        merges.append(pair)
        token_bytes.append(merged_bytes)
        known.add(merged_bytes)

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in pair_words.pop(pair):
            word, f = words[i], freqs[i]
            new_word = merge_word(word, pair, new_id)
            if len(new_word) == len(word):
                continue                  # the pair left this word in an earlier merge
            for p in zip(word, word[1:]):
                delta[p] -= f
            for p in zip(new_word, new_word[1:]):
                delta[p] += f
                pair_words[p].add(i)
            words[i] = new_word
        for p, d in delta.items():
            if d == 0 or p == pair:
                continue
            pair_freq[p] += d
            if pair_freq[p] > 0:
                heapq.heappush(heap, (-pair_freq[p], p))
            else:
                del pair_freq[p]
    return merges


# -----------------------------------------------------------------------------
# the tokenizers

class BPETokenizer:
    """Byte-level BPE: ids 0-255 are bytes, 256.. are merges, then <pad>, <bos>, <eos>."""

    kind = "bpe"

    def __init__(self, merges: list[tuple[int, int]], pattern: str = SPLIT_PATTERN):
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        token_bytes = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            token_bytes.append(token_bytes[a] + token_bytes[b])
        # tiktoken merges adjacent pieces in order of the rank of their concatenation, which
        # replays our merges exactly when rank = token id.
        ranks = {tb: i for i, tb in enumerate(token_bytes)}
        n = len(token_bytes)
        self.pad_id, self.bos_id, self.eos_id = n, n + 1, n + 2
        self.vocab_size = n + 3
        self.specials = {"<pad>": self.pad_id, "<bos>": self.bos_id, "<eos>": self.eos_id}
        self.enc = tiktoken.Encoding(name=f"bpe{self.vocab_size}", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=self.specials)

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        n_merges = vocab_size - 256 - 3
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: "
                             "it needs at least 259 (256 bytes + pad, bos, eos)")
        return cls(learn_bpe(texts, n_merges))

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # a plain loop: tiktoken's encode_ordinary_batch spends more time in its thread pool
        # than in encoding when the texts are short sentences (measured 6-15x slower here)
        return [self.enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Special tokens are dropped; a byte sequence cut mid-character decodes as U+FFFD."""
        return self.enc.decode([i for i in ids if i < self.pad_id], errors="replace")

    def piece(self, i: int) -> str:
        """A readable label for one id (for plots): 'Ġ' marks a leading space."""
        if i >= self.pad_id:
            return next(k for k, v in self.specials.items() if v == i)
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace").replace(" ", "Ġ")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "merges": [list(m) for m in self.merges], "pattern": self.pattern}


class CharTokenizer:
    """One id per character: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then characters by frequency."""

    kind = "char"
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.SPECIALS) + len(self.chars)
        self.char_to_id = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "CharTokenizer":
        counts = Counter()
        for text in texts:
            counts.update(text)
        # the most frequent characters first; ties broken by code point so the order is stable
        ranked = sorted(counts, key=lambda c: (-counts[c], c))
        return cls(ranked[: max(0, vocab_size - len(cls.SPECIALS))])

    def encode(self, text: str) -> list[int]:
        return [self.char_to_id.get(c, self.unk_id) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Special tokens are dropped, except <unk> which stays visible as '\u2047' (⁇)."""
        offset = len(self.SPECIALS)
        return "".join(self.chars[i - offset] if i >= offset else "\u2047"
                       for i in ids if i >= offset or i == self.unk_id)

    def piece(self, i: int) -> str:
        return self.SPECIALS[i] if i < len(self.SPECIALS) else self.chars[i - len(self.SPECIALS)]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class CompactTiktoken:
    """A pretrained tiktoken encoding restricted to the ids the training corpus uses.

    <pad>=0, <bos>=1, <eos>=2, <unk>=3, then the kept original ids, most frequent first.
    Original ids not kept (never seen in training, or beyond vocab_size) become <unk>.
    """

    kind = "tiktoken"
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

    def __init__(self, name: str, kept_ids: list[int], enc: "tiktoken.Encoding | None" = None):
        self.name = name
        self.enc = enc if enc is not None else load_tiktoken(name)
        self.kept_ids = list(kept_ids)
        self.vocab_size = len(self.SPECIALS) + len(self.kept_ids)
        self.to_compact = {orig: i + len(self.SPECIALS) for i, orig in enumerate(self.kept_ids)}

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, name: str,
              enc: "tiktoken.Encoding | None" = None) -> "CompactTiktoken":
        enc = enc if enc is not None else load_tiktoken(name)
        counts = Counter()
        for text in texts:
            counts.update(enc.encode_ordinary(text))
        ranked = sorted(counts, key=lambda i: (-counts[i], i))
        return cls(name, ranked[: max(0, vocab_size - len(cls.SPECIALS))], enc)

    def encode(self, text: str) -> list[int]:
        return [self.to_compact.get(i, self.unk_id) for i in self.enc.encode_ordinary(text)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        get = self.to_compact.get
        return [[get(i, self.unk_id) for i in self.enc.encode_ordinary(t)] for t in texts]

    def decode(self, ids: list[int]) -> str:
        offset = len(self.SPECIALS)
        pieces, run = [], []
        for i in ids:
            if i >= offset:
                run.append(self.kept_ids[i - offset])
            elif i == self.unk_id:
                pieces += [self.enc.decode(run, errors="replace"), "\u2047"]
                run = []
        pieces.append(self.enc.decode(run, errors="replace"))
        return "".join(pieces)

    def piece(self, i: int) -> str:
        if i < len(self.SPECIALS):
            return self.SPECIALS[i]
        raw = self.enc.decode_single_token_bytes(self.kept_ids[i - len(self.SPECIALS)])
        return raw.decode("utf-8", errors="replace").replace(" ", "Ġ")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "kept_ids": self.kept_ids}


def load_tiktoken(name: str) -> "tiktoken.Encoding":
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 - tiktoken raises ValueError, requests/OSError errors, ...
        raise ValueError(
            f"tokenizer 'tiktoken:{name}': the encoding could not be loaded ({type(e).__name__}: {e}). "
            "tiktoken downloads its vocabulary on first use, so it needs network once (or a "
            "TIKTOKEN_CACHE_DIR that holds it). Without network use --tokenizer=bpe, which is "
            "learned from the training data.") from None


Tokenizer = BPETokenizer | CharTokenizer | CompactTiktoken


def train_tokenizer(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
    """kind: 'bpe' | 'char' | 'tiktoken:<name>'."""
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    if kind == "char":
        return CharTokenizer.train(texts, vocab_size)
    if kind.startswith("tiktoken:"):
        return CompactTiktoken.train(texts, vocab_size, kind.split(":", 1)[1])
    raise ValueError(f"tokenizer='{kind}' is not known: use 'bpe', 'char' or 'tiktoken:<name>' "
                     "(e.g. tiktoken:gpt2)")


def pair_state(src_tok: Tokenizer, tgt_tok: Tokenizer) -> dict:
    """The source/target tokenizers as plain data; a joint vocabulary is stored once."""
    joint = src_tok is tgt_tok
    return {"src": src_tok.state_dict(), "tgt": None if joint else tgt_tok.state_dict(), "joint": joint}


def pair_from_state(state: dict) -> tuple[Tokenizer, Tokenizer]:
    """Inverse of pair_state: a joint vocabulary comes back as one object used for both sides."""
    src_tok = tokenizer_from_state(state["src"])
    return src_tok, src_tok if state["joint"] else tokenizer_from_state(state["tgt"])


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from `state_dict()` (as stored in a checkpoint)."""
    kind = state.get("kind")
    if kind == "bpe":
        return BPETokenizer(state["merges"], state["pattern"])
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "tiktoken":
        return CompactTiktoken(state["name"], state["kept_ids"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in saved state")
