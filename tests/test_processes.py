"""Several processes (torchrun with gloo on the CPU): the same losses as one process accumulating
the global batch, exact resume, one data cache built by process 0, one clock and one learning rate
for every process. (The averaging of gradients in-process, its collective faked: test_runtime.py.)"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, TINY, run, train_records

@pytest.mark.slow      # ~20 s: five training processes
def test_two_processes_match_one_process_with_the_same_global_batch_and_resume(tmp_path):
    """torchrun with 2 CPU processes (gloo) == 1 process accumulating the same 2 batches per step;
    a 2-process run stopped at step 3 and resumed with torchrun continues exactly."""
    common = [*TINY, "--dropout=0.1", "--max_iters=5", "--eval_interval=5", "--eval_sentences=5",
              "--warmup_frac=0", "--learning_rate=2e-3", "--min_lr=2e-3"]

    def torchrun(*args):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train.py", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
    run("train.py", *common, "--dropout=0.0", f"--out_dir={tmp_path / 'one'}", "--grad_accum=2")
    torchrun(*common, "--dropout=0.0", f"--out_dir={tmp_path / 'two'}")
    one = {r["step"]: r["loss"] for r in train_records(tmp_path / "one")}
    two = {r["step"]: r["loss"] for r in train_records(tmp_path / "two")}
    assert list(two) == list(range(1, 6))                # only rank 0 wrote the log, once per step
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    torchrun(*common, f"--out_dir={tmp_path / 'straight'}")
    torchrun(*common, f"--out_dir={tmp_path / 'resumed'}", "--max_iters=3")
    assert not os.path.exists(tmp_path / "resumed" / "ckpt.pt.tmp")
    torchrun(f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_iters=5")
    straight = {r["step"]: r["loss"] for r in train_records(tmp_path / "straight")}
    assert {r["step"]: r["loss"] for r in train_records(tmp_path / "resumed")} == straight
    other = run("train.py", f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_iters=8", check=False)
    assert other.returncode == 2 and "trained with 2 process(es)" in other.stderr   # 1 process would take other batches


@pytest.mark.slow      # ~10 s: torchrun with two processes
def test_under_torchrun_process_0_builds_the_data_cache_and_the_others_read_it(tmp_path):
    tiny = [a for a in TINY if not a.startswith("--cache_dir")]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "tests/faulty_train.py", "count_builds", "0", *tiny, f"--cache_dir={tmp_path / 'cache'}",
                          "--max_iters=1", "--eval_interval=1", "--eval_sentences=5", f"--out_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.findall(r"process (\d+) builds the data", out.stdout) == ["0"]    # (two processes' lines may be glued)
    assert len(os.listdir(tmp_path / "cache")) == 1                # one cache file, no temporary one left


@pytest.mark.slow      # ~15 s: torchrun with two processes
def test_process_0s_clock_stops_every_process_at_the_same_step(tmp_path):
    """Process 1's clock runs 30 times as fast: were each process to decide from its own clock,
    process 1 would see the 3-second budget spent after 0.1 s and stop while process 0 waited for
    it in a collective, and it would follow another learning rate. Both follow one learning rate,
    step by step (the schedule's clock moves with process 0's training time)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/faulty_train.py", "skew_clock", "30", *TINY, "--max_minutes=0.05",
                             "--eval_interval=100000", "--eval_sentences=5", f"--out_dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "RATES_DIR": str(tmp_path)})
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:                          # a process waits forever for the other
        os.killpg(proc.pid, signal.SIGKILL)                    # (torchrun's workers too)
        raise
    assert proc.returncode == 0, stdout + stderr
    ran = {rank: json.loads((tmp_path / f"rates_{rank}.json").read_text()) for rank in "01"}   # (files: two
    assert ran["0"]["stopped"] == ran["1"]["stopped"] > 1      # processes' lines on one pipe can interleave)
    assert len(ran["0"]["rates"]) == ran["0"]["stopped"]       # it trained (for process 0's 3 seconds)
    assert ran["0"]["rates"] == ran["1"]["rates"]              # bit for bit
