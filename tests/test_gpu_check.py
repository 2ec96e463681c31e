"""tools/gpu_check.py, the check of the GPU path, run on a CPU with the toy task so that it still
works on the day a GPU is at hand (python -m pytest -m slow tests/test_gpu_check.py): a part that
fails or runs out of time is recorded and the others still run, a second command adds its parts to
the first's gpu_check.json, and a machine without transformers or matplotlib still gets its figures."""
import json

import pytest

from helpers import CACHE, run


def gpu_check(out_dir, *args, check=True):
    return run("tools/gpu_check.py", "--device=cpu", "--config=config/toy_reverse.py", f"--out_dir={out_dir}",
               "--minutes=0.03", *args, check=check)


@pytest.mark.slow                    # ~25 s: a failing pytest, a training run and two decoding processes
def test_a_failed_part_is_recorded_and_the_other_parts_still_run(tmp_path):
    out = gpu_check(tmp_path, "--parts=tests,train,decode", "--tests=tests/does_not_exist.py", "--test_workers=1",
                    f"--train_args={CACHE} --eval_interval=50 --plot=False", "--beam=2", "--decode_sentences=100")
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "time limits: tests 270 s, train 42 s, decode 55 s; 367 s in all" in out.stdout
    assert not result["tests"]["ok"] and "does_not_exist.py" in result["tests"]["error"]
    assert result["train"]["ok"] and result["train"]["steps"] > 0 and result["train"]["eval_seconds"]
    assert result["decode"]["ok"] and result["decode"]["sentences"] == 100
    assert set(result["decode"]["decoding"]) == {"greedy, cold", "greedy, warm", "beam 2, cold", "beam 2, warm"}
    assert "| decoding 100 test sentences | beam 2, warm |" in out.stdout and "| tests | failed |" in out.stdout
    again = gpu_check(tmp_path, "--parts=train", check=False)   # a part already there is not replaced by accident
    assert again.returncode == 2 and "--overwrite=True" in again.stderr


@pytest.mark.slow                    # ~25 s: a training run and the step bench
def test_a_second_command_adds_its_parts_where_transformers_and_matplotlib_are_missing(tmp_path, monkeypatch):
    shim = tmp_path / "shim"                                    # packages that fail to import, as if not installed
    for package in ("transformers", "matplotlib"):
        (shim / package).mkdir(parents=True)
        (shim / package / "__init__.py").write_text("raise ImportError('not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", str(shim))
    out_dir = tmp_path / "check"
    gpu_check(out_dir, "--parts=tests", "--tests_limit=0.2")    # stopped at its time limit, before pytest is up
    # no --plot=False: without matplotlib the check must add it, or the run fails at its end
    out = gpu_check(out_dir, "--parts=train,bench", f"--train_args={CACHE} --eval_interval=50", "--dtypes=float32",
                    "--bench_steps=1")
    result = json.loads((out_dir / "gpu_check.json").read_text())
    assert not result["tests"]["ok"] and "stopped after 0.2 s" in result["tests"]["error"]
    assert result["train"]["ok"] and "matplotlib" in result["train"]["notes"][0]
    assert result["bench"]["ok"] and "MarianMT" in result["bench"]["notes"][0] and "note: MarianMT" in out.stdout
    assert set(result["bench"]["tokens_per_s"]["float32"]) == {"this project, Transformer", "torch.nn.Transformer"}
