"""
What the data pipeline did with a corpus: rows loaded, kept and dropped per split (and why),
the vocabulary, tokens per sentence, unknown tokens, batches and padding at the configured
batch size, and a few sentences as ids and pieces. Reads the data knobs of a training config.

    python tools/data_report.py config/transformer_multi30k.py --dataset=../shared/data/multi30k_en_de
"""

import os
import sys
import time
from dataclasses import asdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
from configurator import configure, main_guard  # noqa: E402
from batching import batch_cost, make_batches  # noqa: E402
from data import Data, DataConfig, DataError, load_data  # noqa: E402

seed = 1337  # seed of the batch order the report measures


def padding_fraction(split, batches: list[np.ndarray]) -> float:
    """Share of the padded batch tensors (source + target) that is padding."""
    real = padded = 0
    for idx in batches:
        s, t = split.src_lens[idx] + 1, split.tgt_lens[idx] + 1
        real += int(s.sum() + t.sum())
        padded += batch_cost(len(idx), int(s.max()), int(t.max()))
    return 1 - real / max(padded, 1)


def report(cfg: DataConfig, data: Data, seed: int = 1337) -> None:
    print(f"\n== data report: {cfg.dataset} {cfg.src_lang}->{cfg.tgt_lang}, tokenizer {cfg.tokenizer}")
    print(f"{'split':<11}{'loaded':>9}{'kept':>9}  dropped / truncated")
    for split, r in data.report.items():
        notes = [f"{r[k]:,} {k}" for k in ("bad_rows", "empty", "too_long", "bad_ratio", "truncated") if r.get(k)]
        carved = " (carved from train)" if r.get("carved_from_train") else ""
        print(f"{split:<11}{r['loaded']:>9,}{r['kept']:>9,}  {', '.join(notes) or '-'}{carved}")
    same = data.src_tok is data.tgt_tok
    print(f"vocabulary: {data.src_tok.vocab_size:,}" + (" (joint)" if same else f" / {data.tgt_tok.vocab_size:,}"))
    train = data.splits["train"]
    for side, lens, texts, tok in (("source", train.src_lens, train.src_text, data.src_tok),
                                   ("target", train.tgt_lens, train.tgt_text, data.tgt_tok)):
        lang = cfg.src_lang if side == "source" else cfg.tgt_lang
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        line = (f"{side} ({lang}): tokens/sentence mean {lens.mean():.1f}, p95 {np.percentile(lens, 95):.0f}, "
                f"max {lens.max()}; {n_bytes / max(lens.sum(), 1):.2f} bytes/token")
        unk = getattr(tok, "unk_id", None)
        if unk is not None:
            for split_name, sp in data.splits.items():
                flat = sp.src_flat if side == "source" else sp.tgt_flat
                line += f"; unk {split_name} {np.mean(flat == unk):.3%}"
        print(line)
    batches = make_batches(train.src_lens, train.tgt_lens, cfg.batch_tokens, seed=seed)
    sizes = np.array([len(b) for b in batches])
    print(f"batches at batch_tokens={cfg.batch_tokens:,}: {len(batches):,} per epoch, "
          f"{sizes.mean():.0f} sentences each on average, padding {padding_fraction(train, batches):.1%}")
    val = data.splits["validation"]
    for i in range(min(3, len(val))):
        ids = val.src(i).tolist()
        print(f"example {i}: {val.src_text[i]!r}\n  ids {ids[:16]}{' ...' if len(ids) > 16 else ''}\n"
              f"  pieces {[data.src_tok.piece(j) for j in ids[:16]]}\n  decoded {data.src_tok.decode(ids)!r}")


def main() -> None:
    knobs = {**asdict(DataConfig()), "seed": seed}
    # strict_file=False: a training config also sets model knobs, which are not ours to check
    configure(knobs, doc_files=(os.path.join(os.path.dirname(__file__), "..", "data.py"), __file__),
              strict_file=False)
    report_seed = knobs.pop("seed")
    cfg = DataConfig(**knobs)
    t0 = time.time()
    data = load_data(cfg)
    report(cfg, data, report_seed)
    print(f"\n(report in {time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main_guard(main, DataError)
