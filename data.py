"""
Parallel text in, tokenized splits out (batching.py cuts them into batches):

    load pairs (hub or local folder) -> carve validation/test if missing -> clean (counts
    printed) -> learn a tokenizer on train -> tokenize + cache on disk

The knobs are DataConfig's fields (train.py takes them as its own). A report of what the
pipeline did: python tools/data_report.py config/transformer_multi30k.py --dataset=FOLDER.
Leaves out: streaming corpora larger than memory, back-translation, data augmentation.
"""

import hashlib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from tokenizer import Tokenizer, pair_from_state, pair_state, train_tokenizer

CACHE_VERSION = 4        # bump when the cached format or the cleaning rules change


@dataclass
class DataConfig:
    dataset: str = "Helsinki-NLP/opus_books"  # hub name, a local folder (train.jsonl ...), or toy:copy / toy:reverse
    dataset_config: str = "en-it"  # hub config name ('' for none, e.g. bentrevett/multi30k)
    src_lang: str = "en"  # source language key in the data
    tgt_lang: str = "it"  # target language key in the data
    val_size: int = 1000  # sentences carved out for validation when the data has no such split (5% if smaller)
    test_size: int = 1000  # sentences carved out for test when the data has no such split (5% if smaller)
    tokenizer: str = "bpe"  # 'bpe' | 'char' | 'tiktoken:<name>'
    vocab_size: int = 8000  # tokenizer vocabulary size (an upper bound for char)
    joint_vocab: bool = True  # one vocabulary for source and target (allows three-way embedding tying)
    max_len: int = 128  # tokens per side; longer training pairs are dropped or truncated
    too_long: str = "drop"  # what to do with training pairs over max_len: 'drop' | 'truncate'
    max_len_ratio: float = 3.0  # drop training pairs whose (longer+1)/(shorter+1) token ratio exceeds this
    batch_tokens: int = 4096  # tokens per batch, padded source + target (the batch size)
    cache_dir: str = "cache"  # where tokenized splits are cached ('' = no cache)
    lowercase: bool = False  # lower-case both sides of every split, as published Multi30k results are trained

    @classmethod
    def of(cls, config: dict) -> "DataConfig":
        """The data knobs of a config dict (train.py's, or a checkpoint's); a knob that a checkpoint
        from before it existed lacks takes its default, the behaviour it was trained with."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


class DataError(ValueError):
    """A problem with the input data, worded for the person who has to fix it."""


# -----------------------------------------------------------------------------
# loading raw sentence pairs

def _hub_error(cfg: DataConfig, err: Exception) -> DataError:
    name = cfg.dataset + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
    return DataError(
        f"could not load dataset '{name}' from the Hugging Face hub: {type(err).__name__}: {err}\n"
        f"Without network, use a local folder: on a machine with network run\n"
        f"  for split, d in datasets.load_dataset('{cfg.dataset}', {cfg.dataset_config or None!r}).items(): "
        f"d.to_json(f'FOLDER/{{split}}.jsonl')\n"
        f"copy FOLDER here and pass --dataset=FOLDER. Any folder with train.jsonl (optionally "
        f"validation.jsonl, test.jsonl, or .parquet) works, with rows like "
        f"{{\"translation\": {{\"{cfg.src_lang}\": \"...\", \"{cfg.tgt_lang}\": \"...\"}}}} "
        f"or flat \"{cfg.src_lang}\"/\"{cfg.tgt_lang}\" columns.")


SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def _local_split_files(folder: str) -> dict[str, str]:
    found = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            for ext in ("jsonl", "json", "parquet"):
                path = os.path.join(folder, f"{name}.{ext}")
                if split not in found and os.path.isfile(path):
                    found[split] = path
    if "train" not in found:
        raise DataError(f"dataset folder '{folder}' has no train.jsonl, train.json or train.parquet "
                        f"(it holds: {', '.join(sorted(os.listdir(folder))) or 'nothing'})")
    return found


def _read_jsonl(path: str) -> list:
    """One JSON value per line -> list of rows; a line that is not JSON or not UTF-8 is an error
    naming the file and line (a broken file should be fixed, not half-read)."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid UTF-8 ({e.reason} at byte {e.start}). "
                                "Re-encode the file as UTF-8 or remove the line.") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not JSON ({e.msg}, column {e.colno}). Each line of a "
                                ".jsonl file must be one JSON object, e.g. "
                                '{"translation": {"en": "...", "it": "..."}}') from None
    return rows


def _rows_to_pairs(rows: list, cfg: DataConfig, where: str) -> tuple[list[tuple[str, str]], int]:
    """Rows in the hub's translation schema ({"translation": {lang: text}}) or with flat language
    columns ({lang: text}) -> (pairs, bad rows). A row without both languages as strings (missing,
    null, a number, not an object) is dropped and counted; if no row is usable the schema is wrong."""
    pairs, bad = [], 0
    for r in rows:
        record = r.get("translation", r) if isinstance(r, dict) else None
        src, tgt = (record.get(cfg.src_lang), record.get(cfg.tgt_lang)) if isinstance(record, dict) else (None, None)
        if isinstance(src, str) and isinstance(tgt, str):
            pairs.append((src, tgt))
        else:
            bad += 1
    if not pairs and rows:
        first = rows[0]
        shape = (f"keys {', '.join(map(str, first.get('translation', first)))}"
                 if isinstance(first, dict) and isinstance(first.get("translation", first), dict)
                 else f"a {type(first).__name__}")
        raise DataError(f"{where}: no row has both '{cfg.src_lang}' and '{cfg.tgt_lang}' as text (the first row "
                        f"has {shape}). Rows must look like "
                        f'{{"translation": {{"{cfg.src_lang}": "...", "{cfg.tgt_lang}": "..."}}}} or have flat '
                        f'"{cfg.src_lang}"/"{cfg.tgt_lang}" columns; check --src_lang/--tgt_lang.')
    return pairs, bad


def _read_json(path: str) -> list:
    """A .json file: one JSON array of rows, or JSON lines (what `Dataset.to_json` writes)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        return _read_jsonl(path)
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"could not read '{path}': {e}. A .json file must hold one JSON array of rows or one "
                        "JSON object per line.") from None
    if not isinstance(rows, list):
        raise DataError(f"'{path}' holds one {type(rows).__name__}: it must be an array of rows or one row per line")
    return rows


def _datasets(why: str):
    try:
        import datasets  # imported only when needed: it is slow to import, and .jsonl folders do not use it
    except ImportError:
        raise DataError(f"{why} needs the datasets package, which is not installed here: pip install "
                        "datasets, or give a local folder of .jsonl files (--dataset=FOLDER)") from None
    datasets.disable_progress_bars()
    return datasets


def load_raw_pairs(cfg: DataConfig) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """Return ({split: [(src, tgt), ...]} for the splits the source has, {split: bad rows})."""
    if cfg.dataset.startswith("toy:"):
        return toy_pairs(cfg.dataset[4:]), {}
    if os.path.isdir(cfg.dataset):
        tables = {}
        for split, path in _local_split_files(cfg.dataset).items():
            if not path.endswith(".parquet"):
                tables[split] = _read_jsonl(path) if path.endswith(".jsonl") else _read_json(path)
                continue
            datasets = _datasets(f"reading '{path}'")
            try:
                tables[split] = datasets.load_dataset("parquet", data_files=path, split="train").to_list()
            except Exception as e:  # noqa: BLE001 - datasets wraps parse errors in many types
                raise DataError(f"could not read '{path}': {type(e).__name__}: {e}. A .parquet file must "
                                "hold a table.") from None
    elif cfg.dataset.startswith((".", "/", "~")) or cfg.dataset.count("/") > 1:  # a path, not owner/name
        raise DataError(f"dataset folder '{cfg.dataset}' does not exist (working directory: {os.getcwd()})")
    else:
        try:
            loaded = _datasets(f"loading '{cfg.dataset}' from the Hugging Face hub").load_dataset(
                cfg.dataset, cfg.dataset_config or None)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - ConnectionError, OfflineModeIsEnabled, hub 404s, ...
            raise _hub_error(cfg, e) from None
        tables = {}
        for split, names in SPLIT_NAMES.items():
            for name in names:
                if name in loaded and split not in tables:
                    tables[split] = loaded[name].to_list()
    pairs, bad = {}, {}
    for split, table in tables.items():
        pairs[split], bad[split] = _rows_to_pairs(table, cfg, f"{cfg.dataset} [{split}]")
    return pairs, bad


def toy_pairs(task: str, n_train: int = 20000, n_eval: int = 500, seed: int = 1234) -> dict:
    """Digit sequences for checking a model: toy:copy ('4 7 1' -> '4 7 1'), toy:reverse ('4 7 1' -> '1 7 4').

    A tiny model must solve these; when it cannot, suspect the masks or the decoding loop.
    """
    if task not in ("copy", "reverse"):
        raise DataError(f"dataset 'toy:{task}' is not known: use toy:copy or toy:reverse")
    rng = random.Random(seed)

    def pair():
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 12))]
        return " ".join(digits), " ".join(digits if task == "copy" else digits[::-1])

    return {split: [pair() for _ in range(n)]
            for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval))}


# -----------------------------------------------------------------------------
# carving validation/test out of a train-only corpus, keyed on the source sentence

def stable_hash(text: str) -> int:
    """The same integer for the same string on every machine and run (unlike Python's hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def carve_size(requested: int, n_unique: int) -> int:
    """`requested` sentences, or 5% of the distinct sources when that is smaller (small sets)."""
    return min(requested, int(0.05 * n_unique))


def carve_splits(train: list[tuple[str, str]], n_val: int, n_test: int) -> dict[str, list]:
    """Split pairs into train/validation/test by the hash of the source sentence.

    The distinct sources are ordered by their hash; the first n_val go to validation, the next
    n_test to test. Every pair with that source follows it, so a source sentence never lands in
    two splits, and reordering the rows changes nothing (the order of rows within a split is
    kept). n_val or n_test may be 0 when the data already has that split.
    """
    sources = sorted({src for src, _ in train}, key=lambda s: (stable_hash(s), s))
    home = {s: "validation" for s in sources[:n_val]}
    home.update({s: "test" for s in sources[n_val:n_val + n_test]})
    out = {"train": [], "validation": [], "test": []}
    for pair in train:
        out[home.get(pair[0], "train")].append(pair)
    return out


# -----------------------------------------------------------------------------
# cleaning: every drop is counted and reported

def drop_empty(pairs: list[tuple[str, str]]) -> tuple[list, int]:
    kept = [(s, t) for s, t in pairs if s.strip() and t.strip()]
    return kept, len(pairs) - len(kept)


CHARS_PER_TOKEN_MAX = 32   # no tokenizer here has longer tokens on average: beyond max_len * 32 characters cannot fit


def drop_huge(pairs: list[tuple[str, str]], max_len: int) -> tuple[list, int]:
    """Training pairs with a side of more than max_len * 32 characters go before the tokenizer is
    learned: they can never fit max_len tokens, and one multi-megabyte line (a concatenated
    document, binary junk) would otherwise dominate the tokenizer's statistics."""
    limit = max_len * CHARS_PER_TOKEN_MAX
    kept = [(s, t) for s, t in pairs if len(s) <= limit and len(t) <= limit]
    return kept, len(pairs) - len(kept)


def filter_lengths(src_ids: list, tgt_ids: list, max_len: int, too_long: str, max_ratio: float):
    """Return (indices kept, counts) for the training split; truncates in place if asked."""
    counts = {"too_long": 0, "truncated": 0, "bad_ratio": 0}
    keep = []
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        if len(s) > max_len or len(t) > max_len:
            if too_long == "drop":
                counts["too_long"] += 1
                continue
            src_ids[i], tgt_ids[i] = s[:max_len], t[:max_len]
            counts["truncated"] += 1
        ls, lt = len(src_ids[i]), len(tgt_ids[i])
        if (max(ls, lt) + 1) / (min(ls, lt) + 1) > max_ratio:
            counts["bad_ratio"] += 1
            continue
        keep.append(i)
    return keep, counts


# -----------------------------------------------------------------------------
# tokenized splits and their on-disk cache

class Split:
    """One tokenized split: ragged id lists stored flat (ids + offsets) plus the raw text."""

    def __init__(self, src_ids: list, tgt_ids: list, src_text: list[str], tgt_text: list[str]):
        self.src_text, self.tgt_text = src_text, tgt_text
        self.src_flat, self.src_off = _flatten(src_ids)
        self.tgt_flat, self.tgt_off = _flatten(tgt_ids)
        self.src_lens = np.diff(self.src_off)
        self.tgt_lens = np.diff(self.tgt_off)

    def __len__(self) -> int:
        return len(self.src_lens)

    def src(self, i: int) -> np.ndarray:
        return self.src_flat[self.src_off[i]:self.src_off[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_flat[self.tgt_off[i]:self.tgt_off[i + 1]]

    def state_dict(self) -> dict:
        return {"src_flat": torch.from_numpy(self.src_flat), "src_off": torch.from_numpy(self.src_off),
                "tgt_flat": torch.from_numpy(self.tgt_flat), "tgt_off": torch.from_numpy(self.tgt_off),
                "src_text": self.src_text, "tgt_text": self.tgt_text}

    @classmethod
    def from_state(cls, state: dict) -> "Split":
        split = cls.__new__(cls)
        split.src_text, split.tgt_text = state["src_text"], state["tgt_text"]
        split.src_flat, split.src_off = state["src_flat"].numpy(), state["src_off"].numpy()
        split.tgt_flat, split.tgt_off = state["tgt_flat"].numpy(), state["tgt_off"].numpy()
        split.src_lens, split.tgt_lens = np.diff(split.src_off), np.diff(split.tgt_off)
        return split


def _flatten(seqs: list) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    flat = np.fromiter((i for s in seqs for i in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


@dataclass
class Data:
    """Everything training needs from the data: tokenizers, tokenized splits, and what was dropped."""
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    splits: dict          # name -> Split
    report: dict          # counts per split: loaded, bad_rows, empty, too_long, truncated, bad_ratio, kept


def _source_fingerprint(cfg: DataConfig) -> list:
    """What the raw data is: file names, sizes and times for a folder; the name for the hub."""
    if os.path.isdir(cfg.dataset):
        return [(os.path.basename(p), os.path.getsize(p), os.path.getmtime(p))
                for p in sorted(_local_split_files(cfg.dataset).values())]
    return [cfg.dataset]


def cache_path(cfg: DataConfig, tokenizers: tuple | None = None) -> str:
    """The cache file: keyed by everything the tokenized splits depend on (not batch_tokens)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in ("batch_tokens", "cache_dir")}
    key.update(version=CACHE_VERSION, source=_source_fingerprint(cfg), abspath=os.path.abspath(cfg.dataset))
    if tokenizers is not None:      # given, not learned: the splits depend on them
        key["tokenizers"] = hashlib.sha1(repr(pair_state(*tokenizers)).encode()).hexdigest()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(os.path.normpath(cfg.dataset)))
    return os.path.join(cfg.cache_dir, f"{name}-{cfg.src_lang}-{cfg.tgt_lang}-{digest}.pt")


def load_data(cfg: DataConfig, verbose: bool = True, tokenizers: tuple | None = None) -> Data:
    """Load, carve, clean and tokenize `cfg.dataset`, reusing the on-disk cache when it matches.
    tokenizers: (source, target) to tokenize with, instead of learning them from the data (a run
    from a checkpoint reads any corpus with the checkpoint's own: unseen text becomes bytes or <unk>)."""
    log = print if verbose else (lambda *a, **k: None)
    path = cache_path(cfg, tokenizers) if cfg.cache_dir else ""
    if path and os.path.exists(path):
        t0 = time.time()
        state = torch.load(path, weights_only=True)
        src_tok, tgt_tok = pair_from_state(state["tokenizers"])
        data = Data(src_tok, tgt_tok, {k: Split.from_state(v) for k, v in state["splits"].items()}, state["report"])
        log(f"data: loaded tokenized splits from cache {path} in {time.time() - t0:.1f}s")
        return data
    data = build_data(cfg, log, tokenizers)
    if path:
        os.makedirs(cfg.cache_dir, exist_ok=True)
        state = {"tokenizers": pair_state(data.src_tok, data.tgt_tok),
                 "splits": {k: v.state_dict() for k, v in data.splits.items()}, "report": data.report}
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)     # atomic: a crash never leaves a half-written cache file
        log(f"data: cached tokenized splits in {path}")
    return data


def build_data(cfg: DataConfig, log=print, tokenizers: tuple | None = None) -> Data:
    """The pipeline of this file's docstring, without the cache: load the pairs, carve validation
    and test out of train where the corpus lacks them, drop empty pairs (and, from train, pairs
    too long to ever fit), lower-case if asked, learn the tokenizer(s) on train, tokenize every
    split and filter train by length and length ratio. Every drop is counted in the report and
    printed through log; a corpus with no training or validation pairs left is a DataError."""
    if cfg.too_long not in ("drop", "truncate"):
        raise DataError(f"too_long='{cfg.too_long}' is not known: use 'drop' or 'truncate'")
    t0 = time.time()
    raw, bad_rows = load_raw_pairs(cfg)
    report = {split: {"loaded": len(p), "bad_rows": bad_rows.get(split, 0)} for split, p in raw.items()}
    log(f"data: loaded {', '.join(f'{k} {len(v):,}' for k, v in raw.items())} pairs "
        f"from {cfg.dataset} in {time.time() - t0:.1f}s")

    missing = [s for s in ("validation", "test") if s not in raw]
    if missing:   # a train-only corpus (OPUS Books, Europarl): carve the missing splits out of train
        n_unique = len({s for s, _ in raw["train"]})
        n_val = carve_size(cfg.val_size, n_unique) if "validation" in missing else 0
        n_test = carve_size(cfg.test_size, n_unique) if "test" in missing else 0
        carved = carve_splits(raw["train"], n_val, n_test)
        for split in ["train"] + missing:
            raw[split] = carved[split]
            report[split] = {**report.get(split, {"bad_rows": 0}), "loaded": len(carved[split]),
                             "carved_from_train": split != "train"}
        log(f"data: carved {', '.join(f'{s} {len(raw[s]):,}' for s in missing)} pairs out of train "
            f"by source-sentence hash ({n_val:,} / {n_test:,} distinct sources)")

    for split in raw:
        raw[split], report[split]["empty"] = drop_empty(raw[split])
        if cfg.lowercase:   # before the tokenizer is learned, so that it spends no entries on capitals
            raw[split] = [(s.lower(), t.lower()) for s, t in raw[split]]
    raw["train"], huge = drop_huge(raw["train"], cfg.max_len)

    t0 = time.time()
    train_src = [s for s, _ in raw["train"]]
    train_tgt = [t for _, t in raw["train"]]
    if tokenizers is not None:
        src_tok, tgt_tok = tokenizers
        log(f"data: the checkpoint's tokenizers, vocab {src_tok.vocab_size:,}/{tgt_tok.vocab_size:,}")
    elif cfg.joint_vocab:
        src_tok = tgt_tok = train_tokenizer(cfg.tokenizer, train_src + train_tgt, cfg.vocab_size)
    else:
        src_tok = train_tokenizer(cfg.tokenizer, train_src, cfg.vocab_size)
        tgt_tok = train_tokenizer(cfg.tokenizer, train_tgt, cfg.vocab_size)
    if tokenizers is None:
        log(f"data: learned {cfg.tokenizer} tokenizer(s), vocab {src_tok.vocab_size:,}/{tgt_tok.vocab_size:,} "
            f"in {time.time() - t0:.1f}s")

    splits = {}
    for split, pairs in raw.items():
        src_text, tgt_text = [s for s, _ in pairs], [t for _, t in pairs]
        src_ids, tgt_ids = src_tok.encode_batch(src_text), tgt_tok.encode_batch(tgt_text)
        counts = {"too_long": 0, "truncated": 0, "bad_ratio": 0}
        if split == "train":   # validation/test are never filtered: their scores must stay comparable
            keep, counts = filter_lengths(src_ids, tgt_ids, cfg.max_len, cfg.too_long, cfg.max_len_ratio)
            counts["too_long"] += huge
            src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
            src_text, tgt_text = [src_text[i] for i in keep], [tgt_text[i] for i in keep]
        report[split].update(counts, kept=len(src_ids))
        splits[split] = Split(src_ids, tgt_ids, src_text, tgt_text)
    for split, r in report.items():
        dropped = {k: r[k] for k in ("bad_rows", "empty", "too_long", "bad_ratio") if r.get(k)}
        log(f"data: {split:<10} kept {r['kept']:>7,} of {r['loaded']:,}"
            + (f"; dropped {', '.join(f'{v:,} {k}' for k, v in dropped.items())}" if dropped else "")
            + (f"; truncated {r['truncated']:,} to {cfg.max_len} tokens" if r.get("truncated") else ""))
    if len(splits["train"]) == 0:
        raise DataError(f"no training pairs left after cleaning {cfg.dataset}: check src_lang/tgt_lang, "
                        f"max_len={cfg.max_len} and max_len_ratio={cfg.max_len_ratio}")
    if len(splits["validation"]) == 0:   # every run validates: fail here, not at the first evaluation
        raise DataError(f"the validation split of {cfg.dataset} is empty: give it a validation.jsonl (a split carved "
                        f"out of train gets 5% of its distinct source sentences, so those need at least 20)")
    return Data(src_tok, tgt_tok, splits, report)


def data_of_checkpoint(ckpt: dict, dataset: str = "", verbose: bool = True) -> Data:
    """The splits a checkpoint (checkpoint.py's dict) was trained on, tokenized with its tokenizers;
    `dataset` replaces their location (a local folder when the original was a hub name or another
    machine's path)."""
    cfg = DataConfig.of(ckpt["data_config"])
    cfg.dataset = dataset or cfg.dataset
    return load_data(cfg, verbose=verbose, tokenizers=pair_from_state(ckpt["tokenizers"]))
