"""A run folder belongs to one run: a new run never replaces another's checkpoints unless told to,
replacing leaves none of the old run's files, and two live runs never share a folder."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from checkpoint import RUN_FILES
from helpers import ROOT, TINY, run, train_records

RUN = [*TINY, "--eval_interval=4", "--eval_sentences=5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 8-step run with every file a run can write: snapshots, avg.pt, plots."""
    out_dir = tmp_path_factory.mktemp("trained")
    run("train.py", *RUN, "--max_iters=8", "--average_last=2", "--plot=True", f"--out_dir={out_dir}")
    return out_dir


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_a_new_run_into_a_trained_folder_is_refused_and_its_checkpoints_stay(trained, tmp_path):
    folder = copy_of(trained, tmp_path)
    before = {name: (folder / name).read_bytes() for name in ("ckpt.pt", "best.pt", "avg.pt", "log.jsonl")}
    for start in ([], [f"--init_from={trained / 'best.pt'}"]):          # from scratch, or from a checkpoint
        out = run("train.py", *RUN, "--max_iters=2", f"--out_dir={folder}", *start, check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        message = out.stderr.strip()
        assert len(message.splitlines()) == 1 and str(folder) in message and "at step 8" in message
        assert "--init_from=resume" in message and "another --out_dir" in message and "--overwrite=True" in message
    assert {name: (folder / name).read_bytes() for name in before} == before
    # --overwrite=True may not delete the checkpoint the new run starts from
    out = run("train.py", *RUN, "--max_iters=2", f"--out_dir={folder}", f"--init_from={folder / 'best.pt'}",
              "--overwrite=True", check=False)
    assert out.returncode == 2 and "the checkpoint this run starts from" in out.stderr
    assert (folder / "best.pt").read_bytes() == before["best.pt"]


def test_overwrite_replaces_the_whole_run_and_a_run_writes_only_run_files(trained, tmp_path):
    assert set(os.listdir(trained)) - {"run.lock"} <= set(RUN_FILES)   # (what the replace below deletes)
    folder = copy_of(trained, tmp_path)
    run("train.py", *RUN, "--max_iters=2", f"--out_dir={folder}", "--overwrite=True")
    assert sorted(os.listdir(folder)) == ["best.pt", "ckpt.pt", "log.jsonl", "run.lock"]   # no avg.pt, snapshots, plots
    assert [r["step"] for r in train_records(folder)] == [1, 2]          # the new run's log alone


@pytest.mark.slow      # ~13 s: a live run, a second refused, the first killed and resumed
def test_a_second_run_into_a_live_runs_folder_is_refused_and_a_killed_run_blocks_nothing(trained, tmp_path):
    folder = copy_of(trained, tmp_path)
    # a process that claims the folder as train.py does, then stays alive
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoint; checkpoint.claim_run_dir(sys.argv[1], "
                               "False); print('claimed', flush=True); time.sleep(120)", str(folder)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        for args in (["--init_from=resume", "--max_iters=10"], [*RUN, "--max_iters=2", "--overwrite=True"]):
            out = run("train.py", f"--out_dir={folder}", *args, check=False)
            assert out.returncode == 2 and f"another run (process {holder.pid}) is writing into" in out.stderr, \
                out.stderr
        assert (folder / "ckpt.pt").read_bytes() == (trained / "ckpt.pt").read_bytes()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / "run.lock").exists()                              # its marker stays, its lock does not
    original = (trained / "ckpt.pt").read_bytes()
    run("train.py", f"--out_dir={folder}", "--init_from=resume", "--max_iters=10")
    assert train_records(folder)[-1]["step"] == 10                     # resumed where the folder is now,
    assert (trained / "ckpt.pt").read_bytes() == original               # not where it was trained


def test_a_new_averaged_checkpoint_does_not_replace_an_existing_file(trained, tmp_path):
    out = tmp_path / "avg.pt"
    out.write_bytes(b"keep me")
    refused = run("tools/average.py", f"--average={trained}/snapshots/*.pt", f"--out={out}", check=False)
    assert refused.returncode == 2 and "--overwrite=True" in refused.stderr and out.read_bytes() == b"keep me"
    run("tools/average.py", f"--average={trained}/snapshots/*.pt", f"--out={out}", "--overwrite=True")
    assert out.read_bytes() != b"keep me"


def test_a_bench_does_not_replace_an_earlier_measurement(tmp_path):
    earlier = tmp_path / "bench_decode.json"
    earlier.write_text('{"earlier": true}')
    out = run("tools/bench.py", "--bench=decode", f"--out_json={earlier}", check=False)
    assert out.returncode == 2 and "--overwrite=True" in out.stderr and earlier.read_text() == '{"earlier": true}'
