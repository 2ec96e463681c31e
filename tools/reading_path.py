"""
How long the read is: the files README's reading order names (every `name.py` in backticks in
the table rows of its section "Read the code in this order", in two parts: "### The core" and
"### Chapters"; the prose around the tables may name other files, nanoGPT's among them),
their lines per part and in all, the longest functions on that path, how many knobs each script
has, and README's own length. README's line counts come from this table.

    python tools/reading_path.py            # a table; --longest=N lists N functions
"""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure, main_guard  # noqa: E402

longest = 5  # how many of the longest functions to list
readme = "README.md"  # the README whose reading order is measured (relative to the project folder)


def reading_order(path: str) -> dict[str, list[str]]:
    """{part: the .py files named in backticks in its table rows, in order} for the parts ('### The
    core', '### Chapters') of the README section that starts with '## Read the code'."""
    text = open(path, encoding="utf-8").read()
    section = re.search(r"^## Read the code.*?$(.*?)(?=^## )", text, re.S | re.M)
    if section is None:
        raise SystemExit(f"{path} has no section '## Read the code ...'")
    parts = {}
    for title, body in re.findall(r"^### (.+?)$(.*?)(?=^### |\Z)", section.group(1), re.S | re.M):
        seen = [name for names in parts.values() for name in names]
        rows = "\n".join(line for line in body.splitlines() if line.startswith("|"))
        named = re.findall(r"`([\w/]+\.py)`", rows)       # in order, once each, in the first part naming them
        parts[title.strip()] = [name for name in dict.fromkeys(named) if name not in seen]
    if not parts:
        raise SystemExit(f"{path}: the section '## Read the code ...' has no '### ' parts (The core, Chapters)")
    return parts


def functions(path: str) -> list[tuple[int, str]]:
    """(lines, name) of every function and method in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [(n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def knob_count(script: str) -> int:
    """The knobs `python SCRIPT -h` lists."""
    out = subprocess.run([sys.executable, script, "-h"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return sum(1 for line in out.stdout.splitlines() if re.match(r"^  \w+ = ", line))


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    parts = reading_order(os.path.join(ROOT, readme))
    total, funcs, files = 0, [], []
    print(f"{'lines':>6}  file")
    for title, names in parts.items():
        part = 0
        for name in names:
            n = open(os.path.join(ROOT, name), encoding="utf-8").read().count("\n")
            part += n
            funcs += [(length, f"{name}:{fn}") for length, fn in functions(os.path.join(ROOT, name))]
            print(f"{n:>6}  {name}")
        print(f"{part:>6}  in {len(names)} files: {title}\n")
        total, files = total + part, files + names
    print(f"{total:>6}  in {len(files)} files (the reading path)")
    print("longest functions: " + ", ".join(f"{where} {n}" for n, where in sorted(funcs, reverse=True)[:longest]))
    scripts = [name for name in ("train.py", "prune.py", "sample.py") if name in files]
    print("knobs (-h): " + ", ".join(f"{s} {knob_count(s)}" for s in scripts))
    train_own = sum(1 for line in open(os.path.join(ROOT, "train.py"), encoding="utf-8")
                    if re.match(r"^[a-z_0-9]+ = .*#", line))
    print(f"knobs declared in train.py: {train_own}")
    print(f"{readme}: {open(os.path.join(ROOT, readme), encoding='utf-8').read().count(chr(10))} lines")


if __name__ == "__main__":
    main_guard(main)
