"""Shared by every test module: one throw-away cache folder for tokenized toy data, so the
suite's many small training runs tokenize toy:reverse once instead of once per process; and one
thread per process (this one and the scripts it starts). The tests run tiny models, which gain
nothing from a second thread, and threads that outnumber the cores stall each other: on a
2-core machine with other jobs running, the default suite took 15 minutes with torch's 2 threads
per process and 100 s with one."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")   # read by torch when it is imported, here and in subprocesses
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a process killed by a signal (SIGSEGV, SIGABRT) prints where
os.environ["NMT_TEST_CACHE"] = tempfile.mkdtemp(prefix="nmt-tests-")
atexit.register(shutil.rmtree, os.environ["NMT_TEST_CACHE"], ignore_errors=True)


import pytest  # noqa: E402

from helpers import TINY, run  # noqa: E402


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A tiny Transformer trained for 30 steps on toy:reverse (4 heads per attention module)."""
    out_dir = tmp_path_factory.mktemp("toy")
    run("train.py", *TINY, "--n_head=4", "--n_dec_layer=1", "--max_iters=30", "--eval_interval=30",
        "--eval_sentences=20", f"--out_dir={out_dir}")
    return out_dir / "best.pt"
