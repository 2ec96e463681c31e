"""common.py and runtime.py: which device, precision and process group a run gets, as pure functions
of the knobs, the environment torchrun sets and the hardware (faked here: no GPU is needed); fp16's
loss scaler; the gradients of several processes averaged (their collective faked)."""
import os

import pytest

from configurator import ConfigError
from common import pick_dtype, place
from runtime import Runtime

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
    import torch

    import train
    optimizer = train.make_optimizer(torch.nn.Linear(2, 2), train.DEFAULTS)
    for dtype in ("float16", "bfloat16", "float32"):
        rt = Runtime("cpu", dtype)
        assert rt.start(optimizer, train.DEFAULTS, None, train.RunState) == train.RunState()
        assert (rt.scaler is not None) == (dtype == "float16") and rt.master
        assert rt.state()["scaler"] is None or dtype == "float16"


def test_two_processes_average_to_the_gradient_of_the_whole_batch(monkeypatch):
    """Each process divides its loss by the mean target-token count (rt.mean) and the gradients are
    averaged (runtime.average_gradients): the gradient one process computes for both batches
    together. Process 1's side runs first here; its all_reduce input is what process 0's adds."""
    import torch
    import torch.distributed as dist

    from loss import sequence_loss
    from model_transformer import Transformer, TransformerConfig
    from runtime import average_gradients

    def model():
        torch.manual_seed(0)
        return Transformer(TransformerConfig(src_vocab=12, tgt_vocab=12, pad_id=0, d_model=16, n_head=2,
                                             n_enc_layer=1, n_dec_layer=1, d_ff=32, dropout=0.0, attn_dropout=0.0,
                                             ff_dropout=0.0), verbose=False)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(3, 12, (n, 6), generator=g) for _ in range(3)) for n in (3, 5)]
    batches[0][2][0, 2:] = 0                                             # the two hold different token counts
    counts = [float((b[2] != 0).sum()) for b in batches]

    def loss_sum(m, batch):
        return sequence_loss(m(batch[0], batch[1]), batch[2], 0, 0.1)
    whole = model()
    ((loss_sum(whole, batches[0]) + loss_sum(whole, batches[1])) / sum(counts)).backward()
    sent = []
    monkeypatch.setattr(dist, "all_reduce", lambda t: sent.append(t.clone()))
    one = model()
    (loss_sum(one, batches[1]) / (sum(counts) / 2)).backward()
    average_gradients(one, 2)                                            # process 1: what it sends
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(sent.pop()))
    rt, zero = Runtime("cpu", "float32", rank=0, world_size=2), model()
    sent.append(torch.tensor(counts[1]))
    n_tok = rt.mean(torch.tensor(counts[0]))
    assert n_tok.item() == sum(counts) / 2
    (loss_sum(zero, batches[0]) / n_tok).backward()
    average_gradients(zero, 2)                                           # adds process 1's flat gradients
    for (name, p), q in zip(zero.named_parameters(), whole.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


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
