"""Run train.py with a fault injected, for tests/test_faults.py:

    python tests/faulty_train.py MODE N train.py-arguments...

MODE says where the N-th call (counted from 1 in this process) goes wrong:
    kill_step   SIGKILL inside the training loss computation (call k is step k)
    kill_eval   SIGKILL at the start of the N-th evaluation
    kill_save   the N-th checkpoint write: half the bytes reach the temporary file, then SIGKILL
    nan_loss    training loss calls N, N+1, ... return NaN (every step from then on is non-finite)
    nan_once    only training loss call N returns NaN
    disk_full   the N-th checkpoint write fails with ENOSPC (no space left on device)
    skew_clock  every process but process 0 sees its clock run N times as fast (for torchrun runs);
                each process writes the learning rate of every step it took, and the step it stopped
                at, to $RATES_DIR/rates_RANK.json
    count_builds  (N unused) each process says when it builds the data instead of reading the cache
Each process prints the step it stopped at when train.py returns.
"""
import errno
import io
import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import torch  # noqa: E402

import runtime  # noqa: E402
import train  # noqa: E402

mode, n = sys.argv[1], int(sys.argv[2])
sys.argv = ["train.py", *sys.argv[3:]]
calls = 0


def nth_call() -> bool:
    global calls
    calls += 1
    return calls == n if mode != "nan_loss" else calls >= n


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def in_probes() -> bool:
    """Whether the probes before step 1 are on the call stack (they take a training step of their own)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(("diagnostics.py", "probes.py")):
            return True
        frame = frame.f_back
    return False


if mode in ("kill_step", "nan_loss", "nan_once"):
    real_loss = train.sequence_loss

    def sequence_loss(*args, **kwargs):
        if not torch.is_grad_enabled() or in_probes():
            return real_loss(*args, **kwargs)     # the checks before step 1 and validation: not counted
        hit = nth_call()
        if hit and mode == "kill_step":
            die()
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if hit else loss
    train.sequence_loss = sequence_loss
elif mode == "kill_eval":
    real_evaluate = train.evaluate

    def evaluate(*args, **kwargs):
        if nth_call():
            die()
        return real_evaluate(*args, **kwargs)
    train.evaluate = evaluate
elif mode in ("kill_save", "disk_full"):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        # only checkpoint writes count (a fresh data cache is written with torch.save too)
        if not (isinstance(obj, dict) and "model_config" in obj) or not nth_call():
            return real_save(obj, f, *args, **kwargs)
        if mode == "disk_full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        die()
    torch.save = save
elif mode == "skew_clock":
    if os.environ.get("RANK", "0") != "0":
        real_time, started = time.time, time.time()
        time.time = lambda: started + (real_time() - started) * n
    real_loop_step, learning_rates = train.loop_step, []

    def loop_step(*args, **kwargs):
        lr, *rest = real_loop_step(*args, **kwargs)
        learning_rates.append(lr)
        return (lr, *rest)
    train.loop_step = loop_step
elif mode == "count_builds":
    import data
    real_build = data.build_data

    def build_data(*args, **kwargs):
        print(f"process {os.environ.get('RANK', 0)} builds the data", flush=True)
        return real_build(*args, **kwargs)
    data.build_data = build_data
else:
    raise SystemExit(f"unknown mode {mode}")


def main():
    run = train.main()
    if mode == "skew_clock":
        # a file per process: two processes' long lines on one pipe can interleave
        with open(os.path.join(os.environ["RATES_DIR"], f"rates_{os.environ.get('RANK', 0)}.json"), "w") as f:
            json.dump({"rates": learning_rates, "stopped": run.step}, f)
    print(f"process {os.environ.get('RANK', 0)} stopped at step {run.step}", flush=True)


runtime.run_process(train.main_guard, main, train.DataError)     # as train.py runs it
