"""tools/gpu_check.py, the one command that checks the GPU path, run on a CPU with the toy task so
that it still works on the day a GPU is at hand (python -m pytest -m slow tests/test_gpu_check.py)."""
import json

import pytest

from helpers import CACHE, run


@pytest.mark.slow                    # ~11 s: a training run and four decoding passes, in two processes
def test_the_gpu_check_trains_decodes_and_prints_its_table(tmp_path):
    args = ["tools/gpu_check.py", "--device=cpu", "--config=config/toy_reverse.py", "--minutes=0.03",
            f"--train_args={CACHE} --eval_interval=50 --plot=False", "--parts=train,decode", "--beam=2", "--decode_sentences=100",
            f"--out_dir={tmp_path}"]
    out = run(*args)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["train"]["ok"] and result["train"]["steps"] > 0 and result["train"]["eval_seconds"]
    assert set(result["decode"]["decoding"]) == {"greedy, cold", "greedy, warm", "beam 2, cold", "beam 2, warm"}
    assert "| decoding 100 test sentences | beam 2, warm |" in out.stdout
    again = run(*args, check=False)                       # an earlier check is not replaced by accident
    assert again.returncode == 2 and "--overwrite=True" in again.stderr
