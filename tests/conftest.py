"""Shared by every test module: one throw-away cache folder for tokenized toy data, so the
suite's many small training runs tokenize toy:reverse once instead of once per process."""
import atexit
import os
import shutil
import tempfile

os.environ["NMT_TEST_CACHE"] = tempfile.mkdtemp(prefix="nmt-tests-")
atexit.register(shutil.rmtree, os.environ["NMT_TEST_CACHE"], ignore_errors=True)
