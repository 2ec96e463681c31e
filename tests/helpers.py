"""What the end-to-end tests share: running the project's scripts as a user would, the tiny
toy-task model their training runs start from, and reading a run's log.jsonl."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = f"--cache_dir={os.environ['NMT_TEST_CACHE']}"   # tests/conftest.py: toy data tokenized once per run
TINY = ["--dataset=toy:reverse", "--tokenizer=char", CACHE, "--d_model=32", "--n_head=2",
        "--n_enc_layer=2", "--n_dec_layer=2", "--d_ff=64", "--batch_tokens=1500", "--eval_sentences=50",
        "--log_interval=1", "--dtype=float32", "--plot=False"]


def run(script, *args, check=True, stdin=None):
    """python SCRIPT ARGS... in the project folder; with check, a non-zero exit fails the test."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, input=stdin)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def train_records(out_dir, kind="train"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]
