"""A run that starts from a checkpoint (--init_from=PATH, to fine-tune it): the data is read with
the checkpoint's tokenizers, whatever corpus it is, in both directions (characters on words they
never saw, BPE on digits); overfit mode turns off the checkpoint's dropout; knobs that would fail
deep inside torch are refused in one line."""
import json
import random

import pytest

import train
from checkpoint import load_checkpoint
from helpers import CACHE, TINY, run
from tokenizer import pair_state


def words_folder(path):
    """A local corpus of letters (none of toy:reverse's digits): each word and its reverse."""
    path.mkdir()
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8))) for _ in range(400)]
    with open(path / "train.jsonl", "w") as f:
        for w in words:
            f.write(json.dumps({"translation": {"en": w, "it": w[::-1]}}) + "\n")
    return path


@pytest.fixture
def seen(monkeypatch):
    """The data every train.main of the test hands to train_loop."""
    data, real = [], train.train_loop
    monkeypatch.setattr(train, "train_loop", lambda model, opt, d, *a, **k: (data.append((model, d)),
                                                                             real(model, opt, d, *a, **k))[1])
    return data


def short(*args):
    return [*TINY, "--max_iters=2", "--eval_interval=2", "--eval_sentences=5", *args]


def test_a_character_checkpoint_reads_words_it_never_saw_as_unk(toy_model, tmp_path, seen):
    """toy:reverse's characters are digits: letters become <unk>, never an id past the embeddings (a
    tokenizer learned from the words would give ids the model has no rows for: IndexError in torch)."""
    words = words_folder(tmp_path / "words")
    train.main(short(f"--dataset={words}", f"--init_from={toy_model}", f"--out_dir={tmp_path / 'run'}"))
    model, data = seen[-1]
    assert pair_state(data.src_tok, data.tgt_tok) == load_checkpoint(str(toy_model))["tokenizers"]
    ids = [i for k in range(len(data.splits["train"])) for i in data.splits["train"].src(k)]
    assert max(ids) < model.cfg.src_vocab and ids.count(data.src_tok.unk_id) == len(ids)
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["tokenizers"] == pair_state(data.src_tok, data.tgt_tok)


def test_a_bpe_checkpoint_reads_digits_with_its_own_merges(tmp_path, seen):
    """A BPE checkpoint learned on words fine-tuned on toy:reverse (where the knobs say tokenizer=char):
    the digits are read as that BPE's bytes, and decode back to the digits (read with characters
    learned from the digits, the same ids would mean other tokens to the model: empty translations)."""
    words = words_folder(tmp_path / "words")
    first = [a for a in short() if not a.startswith(("--dataset", "--tokenizer", "--cache_dir"))]
    train.main([*first, f"--dataset={words}", "--tokenizer=bpe", "--vocab_size=300", CACHE,
                f"--out_dir={tmp_path / 'bpe'}"])
    train.main(short(f"--init_from={tmp_path / 'bpe' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'run'}"))
    model, data = seen[-1]
    assert type(data.src_tok).__name__ == "BPETokenizer" and data.src_tok.vocab_size == model.cfg.src_vocab
    sp = data.splits["train"]
    assert all(data.src_tok.decode(sp.src(k)) == sp.src_text[k] for k in range(50))


def test_overfit_mode_turns_off_a_checkpoints_dropout(toy_model, tmp_path, seen):
    assert load_checkpoint(str(toy_model))["model_config"]["dropout"] > 0         # TINY trains with 0.1
    train.main(short(f"--init_from={toy_model}", "--overfit_batches=1", f"--out_dir={tmp_path}"))
    model = seen[-1][0]
    assert [m.p for m in model.modules() if hasattr(m, "p")] and all(m.p == 0 for m in model.modules() if hasattr(m, "p"))


@pytest.mark.parametrize("knob, says", [("--batch_tokens=-5", "batch_tokens=-5 must be positive"),
                                        ("--d_model=64 --n_head=3", "d_model=64 must be divisible by n_head=3"),
                                        ("--grad_accum=0", "grad_accum=0 must be positive")])
def test_knobs_that_cannot_train_are_refused_in_one_line(tmp_path, knob, says):
    out = run("train.py", *short(*knob.split(), f"--out_dir={tmp_path}"), check=False)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
