"""common.py: which device, precision and process group a run gets, as pure functions of the
knobs, the environment torchrun sets and the hardware (faked here: no GPU is needed)."""
import os

import pytest

from configurator import ConfigError
from common import Runtime, pick_dtype, place

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}


def test_one_process_takes_the_gpu_if_there_is_one():
    assert place("auto", {}, n_gpus=0) == place("cpu", {}, n_gpus=0)
    assert place("auto", {}, n_gpus=0).device == "cpu"
    assert place("auto", {}, n_gpus=2).device == "cuda"
    assert place("cuda:1", {}, n_gpus=2).device == "cuda:1"
    assert place("cpu", {}, n_gpus=2).device == "cpu"        # asked for: the CPU even with GPUs
    assert place("auto", {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, 1).backend == ""   # torchrun, 1 process


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank():
    for knob in ("auto", "cuda"):
        p = place(knob, TORCHRUN, n_gpus=2)
        assert (p.device, p.rank, p.local_rank, p.world_size, p.backend) == ("cuda:1", 3, 1, 4, "nccl")
    p = place("auto", TORCHRUN, n_gpus=0)                     # CPU machines: gloo
    assert (p.device, p.rank, p.world_size, p.backend) == ("cpu", 3, 4, "gloo")
    assert place("cpu", TORCHRUN, n_gpus=2).backend == "gloo"


@pytest.mark.parametrize("knob, env, n_gpus, message", [
    ("cuda", {}, 0, "no CUDA GPU is visible"),
    ("cuda:0", TORCHRUN, 2, "every process would use that one GPU"),
    ("auto", TORCHRUN, 1, "LOCAL_RANK=1 has no GPU"),
    ("mps", {}, 0, "device='mps' is not known"),
])
def test_impossible_placements_are_one_clear_error(knob, env, n_gpus, message):
    with pytest.raises(ConfigError, match=message):
        place(knob, env, n_gpus)


def test_auto_precision_is_bf16_where_the_hardware_has_it_and_fp16_on_older_gpus():
    assert pick_dtype("auto", "cpu", cpu_bf16=True) == "bfloat16"    # AVX512-BF16 or AMX
    assert pick_dtype("auto", "cpu", cpu_bf16=False) == "float32"    # AVX2 only: bf16 is a slow loop there
    assert pick_dtype("auto", "cuda", (9, 0)) == "bfloat16"      # H100
    assert pick_dtype("auto", "cuda", (8, 0)) == "bfloat16"      # A100
    assert pick_dtype("auto", "cuda", (7, 5)) == "float16"       # T4: emulates bf16
    assert pick_dtype("auto", "cuda", (7, 0)) == "float16"       # V100
    assert pick_dtype("float32", "cuda", (7, 5)) == "float32"    # an explicit choice stands
    with pytest.raises(ConfigError, match="dtype='fp8' is not known"):
        pick_dtype("fp8", "cpu")


def test_loss_scaling_only_for_fp16():
    assert Runtime("cpu", "float16").grad_scaler() is not None
    assert Runtime("cpu", "bfloat16").grad_scaler() is None and Runtime("cpu", "float32").grad_scaler() is None
    one = Runtime("cpu", "float32")
    assert one.agree([1.5, 1.2], False) == ([1.5, 1.2], False) and one.master


def test_onednn_keeps_few_compiled_kernels_unless_the_user_says_otherwise():
    """oneDNN keeps a kernel per matrix shape (bf16 on AMX CPUs): capped at 16 before any product runs."""
    import subprocess
    import sys

    from helpers import ROOT
    read = [sys.executable, "-c", "import os, train; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"]
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert subprocess.run(read, capture_output=True, text=True, cwd=ROOT, env=env).stdout.strip() == "16"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "64"
    assert subprocess.run(read, capture_output=True, text=True, cwd=ROOT, env=env).stdout.strip() == "64"
