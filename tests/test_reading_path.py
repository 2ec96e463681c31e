"""tools/reading_path.py counts the files that README's reading order names in its tables' rows,
not those the prose around the tables names; tools/text_to_jsonl.py makes a dataset folder's file."""
import json
import os

import pytest

from configurator import ConfigError
from tools.reading_path import reading_order
from tools.text_to_jsonl import convert

README = """# a project

## Read the code in this order

### The core

Read `model.py` (nanoGPT's) beside ours; `train.py` imports `common.py`.

| | file | lines |
|---|---|---|
| 1 | `model_transformer.py` | 300 |
| 2 | `train.py` | 400 |

### Chapters

Prose that names `speed.py` again.

| chapter | files |
|---|---|
| plumbing | `common.py`, `train.py` |

## Next section

| `tools/bench.py` |
"""


def test_only_the_table_rows_of_each_part_count(tmp_path):
    (tmp_path / "README.md").write_text(README)
    parts = reading_order(str(tmp_path / "README.md"))
    # prose names model.py and speed.py: not counted; train.py is the core's, not again the chapters'
    assert parts == {"The core": ["model_transformer.py", "train.py"], "Chapters": ["common.py"]}


def test_the_readme_names_files_that_exist():
    from helpers import ROOT
    parts = reading_order(os.path.join(ROOT, "README.md"))
    assert "train.py" in parts["The core"] and "runtime.py" in parts["Chapters"]
    assert all(os.path.exists(os.path.join(ROOT, name)) for names in parts.values() for name in names)


def test_text_files_become_a_jsonl_split(tmp_path):
    import gzip
    (tmp_path / "a.en").write_text("A dog runs.\nTwo men.\n")
    with gzip.open(tmp_path / "a.de.gz", "wt", encoding="utf-8") as f:
        f.write("Ein Hund läuft.\r\nZwei Männer.\n")
    assert convert(str(tmp_path / "a.en"), str(tmp_path / "a.de.gz"), "en", "de", str(tmp_path / "d" / "train.jsonl")) == 2
    rows = [json.loads(line) for line in open(tmp_path / "d" / "train.jsonl", encoding="utf-8")]
    assert rows[1] == {"translation": {"en": "Two men.", "de": "Zwei Männer."}}
    (tmp_path / "b.de").write_text("Nur eine Zeile.\n")
    with pytest.raises(ConfigError, match="must pair line for line"):
        convert(str(tmp_path / "a.en"), str(tmp_path / "b.de"), "en", "de", str(tmp_path / "x.jsonl"))
