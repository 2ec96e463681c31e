"""
Make the folder of JSON lines that every command reads offline (--dataset=FOLDER) from a parallel
corpus in plain text: two files per split, one sentence per line, line i of one the translation of
line i of the other (Multi30k's raw files, OPUS's Moses format, ...).

    python tools/text_to_jsonl.py --src=train.en --tgt=train.de --src_lang=en --tgt_lang=de \
        --out=data/multi30k/train.jsonl

Each line becomes {"translation": {"en": "...", "de": "..."}}, the Hugging Face translation schema.
Files ending in .gz are read compressed. The lines are kept as they are (only the line end is
removed); an empty or unpaired line is data.py's to drop and count. Leaves out: aligning
sentences, cleaning.
"""

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ConfigError, configure, main_guard  # noqa: E402

src = ""  # the source side: a text file, one sentence per line (.gz: compressed)
tgt = ""  # the target side, line for line
src_lang = "en"  # the source language's key in the rows (data.py's src_lang)
tgt_lang = "de"  # the target language's key (data.py's tgt_lang)
out = ""  # the .jsonl file to write: train.jsonl, validation.jsonl or test.jsonl in the dataset folder


def read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"'{path}' is not a file: give --src and --tgt, the two sides of one split")
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        return [line.rstrip("\r\n") for line in f]


def convert(src_path: str, tgt_path: str, src_key: str, tgt_key: str, out_path: str) -> int:
    """Write out_path from the two sides; return the number of rows. Sides of unequal lengths are refused."""
    sources, targets = read_lines(src_path), read_lines(tgt_path)
    if len(sources) != len(targets):
        raise ConfigError(f"'{src_path}' has {len(sources):,} lines and '{tgt_path}' {len(targets):,}: the two "
                          "sides of a parallel corpus must pair line for line")
    if src_key == tgt_key:
        raise ConfigError(f"src_lang and tgt_lang are both '{src_key}': give each side its own key")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for s, t in zip(sources, targets):
            f.write(json.dumps({"translation": {src_key: s, tgt_key: t}}, ensure_ascii=False) + "\n")
    return len(sources)


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    if not (src and tgt and out):
        raise ConfigError("give --src, --tgt and --out (python tools/text_to_jsonl.py -h)")
    print(f"wrote {convert(src, tgt, src_lang, tgt_lang, out):,} pairs to {out}")


if __name__ == "__main__":
    main_guard(main)
