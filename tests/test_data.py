"""data.py: loading, deterministic splits, cleaning counts, caching, token-budget batching."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import batching as B
from tools.data_report import padding_fraction
import data as D

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
MULTI30K = os.path.join(SHARED, "multi30k_en_de")
EUROPARL = os.path.join(SHARED, "europarl_en_it")
needs_multi30k = pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="../shared/data/multi30k_en_de absent")
needs_europarl = pytest.mark.skipif(not os.path.isdir(EUROPARL), reason="../shared/data/europarl_en_it absent")

WORDS = "the a cat dog man woman sees runs big small red house street park".split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def make_folder(tmp_path, n=400, splits=("train",), flat=False, seed=0):
    rng = random.Random(seed)
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    for split in splits:
        rows = []
        for _ in range(n):
            s = sentence(rng, rng.randint(2, 10))
            t = s.upper()
            rows.append({"en": s, "xx": t} if flat else {"translation": {"en": s, "xx": t}})
        write_jsonl(folder / f"{split}.jsonl", rows)
    return str(folder)


def cfg_for(folder, tmp_path, **kw):
    base = dict(dataset=folder, dataset_config="", src_lang="en", tgt_lang="xx", vocab_size=300,
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return D.DataConfig(**base)


# --- carving validation/test out of train ---------------------------------------------

def test_carve_is_deterministic_disjoint_and_order_free():
    rng = random.Random(0)
    pairs = [(sentence(rng, rng.randint(1, 8)), f"t{i}") for i in range(3000)]
    pairs += pairs[:200]          # repeated sources must all go to the same split
    a = D.carve_splits(pairs, 100, 120)
    b = D.carve_splits(list(reversed(pairs)), 100, 120)
    for split in a:
        assert sorted(a[split]) == sorted(b[split])          # reordering rows changes nothing
    sources = {k: {s for s, _ in v} for k, v in a.items()}
    assert len(sources["validation"]) == 100 and len(sources["test"]) == 120
    assert not sources["train"] & sources["validation"]
    assert not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]
    assert sum(len(v) for v in a.values()) == len(pairs)


def test_carve_size_small_sets_take_five_percent():
    assert D.carve_size(1000, 100_000) == 1000
    assert D.carve_size(1000, 4000) == 200


def test_stable_hash_is_stable():
    assert D.stable_hash("hello") == D.stable_hash("hello") != D.stable_hash("hello ")
    out = subprocess.run([sys.executable, "-c", "import data; print(data.stable_hash('hello'))"],
                         capture_output=True, text=True, cwd=os.path.dirname(D.__file__), check=True)
    assert int(out.stdout) == D.stable_hash("hello")    # same value in another process


# --- loading and cleaning ---------------------------------------------------------------

def test_local_folder_train_only_is_carved_and_cleaned(tmp_path):
    folder = make_folder(tmp_path, n=2000)
    rows = [json.loads(line) for line in open(os.path.join(folder, "train.jsonl"))]
    rows += [{"translation": {"en": "  ", "xx": "X"}},                   # empty source
             {"translation": {"en": "the cat", "xx": ""}},               # empty target
             {"translation": {"en": "the " * 60, "xx": "THE " * 60}},    # over max_len
             {"translation": {"en": "x" * 100_000, "xx": "X"}},          # a huge line: never reaches the tokenizer
             {"translation": {"en": "the cat", "xx": "THE " * 20}},      # extreme length ratio
             {"translation": {"en": "only one side"}},                   # missing target language
             {"translation": {"en": None, "xx": "X"}},                   # null
             {"translation": {"en": "the cat", "xx": 7}},                # not a string
             {"translation": None}, ["a", "list"]]                       # not an object
    write_jsonl(os.path.join(folder, "train.jsonl"), rows)
    data = D.load_data(cfg_for(folder, tmp_path, max_len=50, val_size=50, test_size=60), verbose=False)
    r = data.report
    assert r["train"]["bad_rows"] == 5
    assert r["train"]["empty"] + r["validation"]["empty"] + r["test"]["empty"] == 2
    assert r["train"]["too_long"] == 2 and r["train"]["bad_ratio"] == 1
    assert "x" * 64 not in data.src_tok.decode(list(range(data.src_tok.vocab_size)))   # no merges learned from it
    assert r["train"]["kept"] == len(data.splits["train"])
    assert r["validation"]["carved_from_train"]
    n_sources = {k: len(set(v.src_text)) for k, v in data.splits.items()}
    assert n_sources["validation"] == 50 and n_sources["test"] == 60
    assert all(len(s) <= 50 for s in map(data.splits["train"].src, range(len(data.splits["train"]))))


def test_truncate_instead_of_drop(tmp_path):
    folder = make_folder(tmp_path, n=300, splits=("train", "validation", "test"))
    with open(os.path.join(folder, "train.jsonl"), "a") as f:
        f.write(json.dumps({"translation": {"en": "the cat " * 40, "xx": "THE CAT " * 40}}) + "\n")
    data = D.load_data(cfg_for(folder, tmp_path, max_len=20, too_long="truncate"), verbose=False)
    assert data.report["train"]["truncated"] >= 1 and data.report["train"]["too_long"] == 0
    assert max(data.splits["train"].src_lens) <= 20


def test_flat_columns_and_existing_splits_are_used(tmp_path):
    folder = make_folder(tmp_path, n=200, splits=("train", "validation", "test"), flat=True)
    data = D.load_data(cfg_for(folder, tmp_path), verbose=False)
    assert len(data.splits["validation"]) == 200 and len(data.splits["test"]) == 200
    assert "carved_from_train" not in data.report["validation"]


def test_lowercase_lowers_every_split_before_the_tokenizer_is_learned(tmp_path):
    folder = make_folder(tmp_path, n=200, splits=("train", "validation", "test"))   # targets in capitals
    cased = D.load_data(cfg_for(folder, tmp_path, joint_vocab=False), verbose=False)
    lower = D.load_data(cfg_for(folder, tmp_path, joint_vocab=False, lowercase=True), verbose=False)
    for split in ("train", "validation", "test"):
        assert lower.splits[split].tgt_text == [t.lower() for t in cased.splits[split].tgt_text]
        assert lower.splits[split].src_text == cased.splits[split].src_text       # already lower-case
    # learned on lower-cased targets, the target tokenizer packs them into far fewer tokens than
    # one learned on the capitals does
    lowered = lower.splits["train"].tgt_text
    assert 2 * sum(map(len, lower.tgt_tok.encode_batch(lowered))) < sum(map(len, cased.tgt_tok.encode_batch(lowered)))


def test_parquet_folder(tmp_path):
    import datasets
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list([{"translation": {"en": "a cat", "xx": "A CAT"}}] * 50).to_parquet(
        str(folder / "train.parquet"))
    pairs, _ = D.load_raw_pairs(cfg_for(str(folder), tmp_path))
    assert pairs["train"][0] == ("a cat", "A CAT") and len(pairs["train"]) == 50


def without_datasets(monkeypatch):
    """This process as on a machine where the datasets package is not installed."""
    monkeypatch.setitem(sys.modules, "datasets", None)        # `import datasets` now raises ImportError


@pytest.mark.parametrize("layout", ["lines", "array"])
def test_a_json_folder_is_read_without_the_datasets_package(tmp_path, monkeypatch, layout):
    without_datasets(monkeypatch)
    folder = tmp_path / "j"
    folder.mkdir()
    rows = [{"translation": {"en": f"a cat {i}", "xx": f"A CAT {i}"}} for i in range(5)]
    text = json.dumps(rows) if layout == "array" else "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "train.json").write_text(text)
    pairs, _ = D.load_raw_pairs(cfg_for(str(folder), tmp_path))
    assert pairs["train"] == [(f"a cat {i}", f"A CAT {i}") for i in range(5)]


def test_parquet_or_the_hub_without_the_datasets_package_is_one_clear_line(tmp_path, monkeypatch):
    without_datasets(monkeypatch)
    folder = tmp_path / "pq"
    folder.mkdir()
    (folder / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(D.DataError, match=r"reading '.*train.parquet' needs the datasets package.*pip install"):
        D.load_raw_pairs(cfg_for(str(folder), tmp_path))
    with pytest.raises(D.DataError, match="from the Hugging Face hub needs the datasets package"):
        D.load_raw_pairs(cfg_for("Helsinki-NLP/opus_books", tmp_path))


@pytest.mark.parametrize("setup, pattern", [
    ("no_train", "has no train.jsonl"),
    ("missing_dir", "does not exist"),
    ("wrong_lang", "no row has both 'en' and 'de'"),
    ("not_json", r"train.jsonl, line 2: not JSON"),
    ("bad_utf8", r"train.jsonl, line 2: not valid UTF-8"),
    ("wrong_schema", r"no row has both 'en' and 'xx' as text \(the first row has keys text, label\)"),
    ("not_objects", r"no row has both .* \(the first row has a list\)"),
])
def test_bad_local_datasets_give_clear_errors(tmp_path, setup, pattern):
    folder = tmp_path / "d"
    folder.mkdir()
    kw = {}
    if setup == "no_train":
        (folder / "notes.txt").write_text("hi")
    elif setup == "missing_dir":
        folder = tmp_path / "nope"
    elif setup == "wrong_lang":
        write_jsonl(folder / "train.jsonl", [{"translation": {"en": "a", "xx": "b"}}])
        kw["tgt_lang"] = "de"
    elif setup == "not_json":
        (folder / "train.jsonl").write_text('{"en": "a", "xx": "b"}\nthis is not json\n')
    elif setup == "bad_utf8":
        (folder / "train.jsonl").write_bytes(b'{"en": "a", "xx": "b"}\n{"en": "caf\xe9", "xx": "b"}\n')
    elif setup == "wrong_schema":
        write_jsonl(folder / "train.jsonl", [{"text": "a", "label": 1}])
    elif setup == "not_objects":
        (folder / "train.jsonl").write_text('["a", "b"]\n')
    with pytest.raises(D.DataError, match=pattern):
        D.load_raw_pairs(cfg_for(str(folder), tmp_path, **kw))


def test_too_few_sentences_for_a_validation_split_is_a_clear_error(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"en": f"a cat {i % 10}", "xx": "b"} for i in range(300)])  # 10 sources
    with pytest.raises(D.DataError, match="validation split of .* is empty: give it a validation.jsonl"):
        D.load_data(cfg_for(str(folder), tmp_path), verbose=False)


def test_hub_unreachable_says_how_to_use_a_local_folder(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}                 # an empty hub cache: nothing to fall back on
    out = subprocess.run([sys.executable, "tools/data_report.py", "--dataset=Helsinki-NLP/opus_books",
                          "--dataset_config=en-it", "--cache_dir="],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(D.__file__), timeout=120)
    assert out.returncode != 0
    assert "Helsinki-NLP/opus_books" in out.stderr and "--dataset=FOLDER" in out.stderr
    assert "Traceback" not in out.stderr


def test_cache_is_reused_and_keyed_by_settings(tmp_path, capsys):
    folder = make_folder(tmp_path, n=300)
    cfg = cfg_for(folder, tmp_path)
    first = D.load_data(cfg)
    second = D.load_data(cfg)
    assert "loaded tokenized splits from cache" in capsys.readouterr().out
    for name in first.splits:
        assert np.array_equal(first.splits[name].src_flat, second.splits[name].src_flat)
        assert first.splits[name].tgt_text == second.splits[name].tgt_text
    assert second.src_tok.encode("the cat") == first.src_tok.encode("the cat")
    assert first.src_tok is first.tgt_tok and second.src_tok is second.tgt_tok   # a joint vocabulary stays joint
    assert D.cache_path(cfg) != D.cache_path(cfg_for(folder, tmp_path, vocab_size=301))
    assert D.cache_path(cfg) == D.cache_path(cfg_for(folder, tmp_path, batch_tokens=999))


def test_toy_tasks():
    pairs, _ = D.load_raw_pairs(D.DataConfig(dataset="toy:reverse"))
    src, tgt = pairs["train"][0]
    assert tgt.split() == src.split()[::-1]
    with pytest.raises(D.DataError, match="toy:copy or toy:reverse"):
        D.load_raw_pairs(D.DataConfig(dataset="toy:sort"))


# --- batching ---------------------------------------------------------------------------

def lengths(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 60, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), 1, None)
    return src, tgt


def test_batches_cover_every_sentence_once_within_budget():
    src, tgt = lengths()
    batches = B.make_batches(src, tgt, 2000, seed=1)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(src)))
    for b in batches:
        cost = B.batch_cost(len(b), src[b].max() + 1, tgt[b].max() + 1)
        assert cost <= 2000 or len(b) == 1


def test_batching_is_reproducible_and_changes_per_epoch():
    src, tgt = lengths()
    a = B.make_batches(src, tgt, 2000, seed=3, epoch=0)
    b = B.make_batches(src, tgt, 2000, seed=3, epoch=0)
    c = B.make_batches(src, tgt, 2000, seed=3, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


def test_no_shuffle_gives_the_same_batches_every_epoch():
    src, tgt = lengths()
    a = B.make_batches(src, tgt, 2000, shuffle=False, seed=3, epoch=0)
    b = B.make_batches(src, tgt, 2000, shuffle=False, seed=9, epoch=5)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_distributed_shares_are_disjoint_and_equal():
    """runtime.py's share of each of 3 processes: as many batches each, no sentence in two shares,
    every batch of the epoch but the last few (fewer than 3) in one."""
    import types

    from runtime import ShareOfBatches
    src, tgt = lengths()
    split = types.SimpleNamespace(src_lens=np.array(src), tgt_lens=np.array(tgt))
    data = types.SimpleNamespace(splits={"train": split})
    every = B.make_batches(src, tgt, 2000, seed=3, epoch=1)
    shares = [ShareOfBatches(data, 2000, 3, 0, r, 3).of_epoch(1) for r in range(3)]
    assert len({len(s) for s in shares}) == 1 and 3 * len(shares[0]) > len(every) - 3
    seen = [set(np.concatenate(s).tolist()) for s in shares]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert [b.tolist() for b in shares[1]] == [b.tolist() for b in every[1::3][:len(shares[1])]]


def test_length_grouping_cuts_padding():
    split = D.Split(*[[list(range(n)) for n in lens] for lens in lengths()], [], [])
    grouped = B.make_batches(split.src_lens, split.tgt_lens, 4000, seed=0)
    # the same batch sizes filled with random sentences
    cuts = np.cumsum([len(b) for b in grouped])[:-1]
    random_batches = np.split(np.random.default_rng(0).permutation(len(split)), cuts)
    assert padding_fraction(split, grouped) < 0.25 * padding_fraction(split, random_batches)


def test_collate_shapes_and_special_tokens(tmp_path):
    folder = make_folder(tmp_path, n=100, splits=("train", "validation", "test"))
    data = D.load_data(cfg_for(folder, tmp_path), verbose=False)
    split, tok = data.splits["train"], data.src_tok
    idx = np.array([0, 1, 2])
    src, tgt_in, tgt_out = B.collate(split, idx, tok, tok)
    assert src.shape == (3, split.src_lens[idx].max() + 1)
    assert tgt_in.shape == tgt_out.shape == (3, split.tgt_lens[idx].max() + 1)
    assert (tgt_in[:, 0] == tok.bos_id).all()
    for b, i in enumerate(idx):
        n = split.tgt_lens[i]
        assert tgt_out[b, n] == tok.eos_id and src[b, split.src_lens[i]] == tok.eos_id
        assert tgt_in[b, 1:n + 1].tolist() == tgt_out[b, :n].tolist()     # shifted by one
        assert tok.decode(tgt_out[b].tolist()) == split.tgt_text[i]


# --- the real corpora (skipped when ../shared/data is absent) ------------------------------

@pytest.mark.slow      # ~4 s: learns a 6k BPE on Multi30k
@needs_multi30k
def test_multi30k_padding_under_five_percent(tmp_path):
    cfg = D.DataConfig(dataset=MULTI30K, dataset_config="", src_lang="en", tgt_lang="de", vocab_size=8000,
                       cache_dir=str(tmp_path))
    data = D.load_data(cfg, verbose=False)
    train = data.splits["train"]
    assert len(data.splits["test"]) == 1000 and len(data.splits["validation"]) == 1014
    for budget in (4096, 8000):
        batches = B.make_batches(train.src_lens, train.tgt_lens, budget, seed=0)
        assert padding_fraction(train, batches) < 0.05
    for text in train.src_text[:2000] + train.tgt_text[:2000]:
        assert data.src_tok.decode(data.src_tok.encode(text)) == text


@needs_europarl
def test_europarl_split_is_disjoint_on_source(tmp_path):
    pairs, _ = D.load_raw_pairs(D.DataConfig(dataset=EUROPARL, dataset_config="", tgt_lang="it"))
    carved = D.carve_splits(pairs["train"], 1000, 1000)
    src = {k: {s for s, _ in v} for k, v in carved.items()}
    assert len(src["validation"]) == len(src["test"]) == 1000
    assert not (src["train"] & src["test"]) and not (src["train"] & src["validation"])
