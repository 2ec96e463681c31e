"""The CUDA path, where a GPU is present (every test here is skipped without one): the toy task
in every precision and attention implementation, both GRU attentions in every precision, cached =
uncached decoding, SDPA = explicit softmax, no cuDNN attention, fp16 loss scaling through an
overflow, an attention without heads, bf16 and fp32 loss curves, exact resume, and a run moving
between CPU and GPU. Where the logic is not CUDA's own, a CPU test checks it too (test_train.py, test_train_step.py,
test_model_transformer.py, test_model_rnn.py).

    python -m pytest tests/test_cuda.py -m "slow or not slow"     # on a machine with a GPU
"""
import math

import pytest
import torch

from helpers import TINY, run, train_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# the toy reverse task, long enough to be solved on a GPU in seconds
TOY = ["config/toy_reverse.py", "--device=cuda", "--log_interval=50", "--eval_interval=600", "--plot=False"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("attn", ["math", "sdpa"])
def test_the_toy_task_is_solved_on_cuda_in_every_precision(tmp_path, dtype, attn):
    run("train.py", *TOY, f"--dtype={dtype}", f"--attn_impl={attn}", f"--out_dir={tmp_path}")
    assert all(math.isfinite(r["loss"]) for r in train_records(tmp_path))
    assert train_records(tmp_path, "eval")[-1]["bleu"] > 95


@pytest.mark.parametrize("attention, dtype", [("dot", "float32"), ("additive", "float32"), ("dot", "bfloat16"),
                                              ("additive", "float16")])
def test_gru_with_attention_learns_the_toy_task_on_cuda(tmp_path, attention, dtype):
    run("train.py", *TINY, "--device=cuda", f"--dtype={dtype}", "--arch=rnn", "--emb_dim=32", "--n_enc_layer=1", "--n_dec_layer=1",
        f"--attention={attention}", "--hidden_size=96", "--bidirectional", "--max_iters=300", "--learning_rate=1e-2",
        "--warmup_frac=0.05", "--dropout=0", "--batch_tokens=3000", "--eval_interval=300", "--eval_sentences=100",
        f"--out_dir={tmp_path}")
    assert train_records(tmp_path, "eval")[-1]["bleu"] > 80


def test_cached_decoding_and_sdpa_agree_with_the_references_on_cuda():
    from dataclasses import asdict
    from decoding import greedy
    from tools.reference import greedy_uncached
    from model_transformer import Transformer, TransformerConfig
    torch.manual_seed(0)
    cfg = TransformerConfig(src_vocab=50, tgt_vocab=50, pad_id=0, d_model=64, n_head=4, n_enc_layer=2, n_dec_layer=2,
                            d_ff=128, dropout=0.0, attn_impl="math")
    model = Transformer(cfg, verbose=False).cuda().eval()
    src = torch.randint(3, 50, (8, 11), device="cuda")
    src[3, 7:] = 0
    cached = greedy(model, src, 1, 2, 0, 20)[0]
    assert torch.equal(cached, greedy_uncached(model, src, 1, 2, 0, 20)[:, :cached.shape[1]])
    tgt = torch.randint(3, 50, (8, 9), device="cuda")
    sdpa = Transformer(TransformerConfig(**{**asdict(cfg), "attn_impl": "sdpa"}), verbose=False).cuda().eval()
    sdpa.load_state_dict(model.state_dict())
    assert torch.allclose(sdpa(src, tgt), model(src, tgt), atol=1e-4)


def test_attention_on_cuda_never_goes_to_cudnn_which_plans_every_new_shape():
    from torch.profiler import profile
    from model_transformer import Transformer, TransformerConfig
    from speed import speed_up
    cfg = TransformerConfig(src_vocab=50, tgt_vocab=50, pad_id=0, d_model=64, n_head=4, dropout=0.0, attn_impl="sdpa")
    model = speed_up(Transformer(cfg, verbose=False)).cuda()
    src, tgt = torch.randint(3, 50, (8, 11), device="cuda"), torch.randint(3, 50, (8, 9), device="cuda")
    src[3, 7:] = 0                                                  # a padding mask: cuDNN's first pick in 2.11
    with profile() as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        model(src, tgt).float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert any("scaled_dot_product" in n for n in names) and not any("cudnn_attention" in n for n in names), names


def tiny_on_cuda(dtype: str, **heads):
    """A tiny Transformer on the GPU (fused attention), its optimizer, the run's Runtime and one CPU batch."""
    from model_transformer import Transformer, TransformerConfig
    from runtime import Runtime
    from train import DEFAULTS, RunState, make_optimizer
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab=12, tgt_vocab=12, pad_id=0, d_model=16, n_head=2, n_enc_layer=1,
                                          n_dec_layer=1, d_ff=32, dropout=0.0, attn_impl="sdpa", **heads),
                        verbose=False).cuda()
    src, tgt_in, tgt_out = (torch.randint(3, 12, (4, 5)) for _ in range(3))
    src[1, 3:], tgt_out[0, 3:] = 0, 0                                    # some padding
    optimizer, rt = make_optimizer(model, DEFAULTS), Runtime("cuda", dtype)
    rt.start(optimizer, DEFAULTS, None, RunState)                          # as train_loop: fp16's scaler
    return model, optimizer, rt, [(src, tgt_in, tgt_out)]


def test_fp16_loss_scaling_on_cuda_skips_an_overflow_then_updates():
    from train import DEFAULTS, train_step
    model, optimizer, rt, batches = tiny_on_cuda("float16")
    scaler = rt.scaler
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.out_proj.weight.register_hook(lambda g: g * float("inf"))   # scaled gradients overflow
    out = train_step(model, optimizer, batches, 0, DEFAULTS, rt)
    hook.remove()
    assert out["update"] == "overflow" and math.isfinite(out["loss"]) and scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())    # nothing updated
    assert [train_step(model, optimizer, batches, 0, DEFAULTS, rt)["update"] for _ in range(3)] == ["done"] * 3
    assert not torch.equal(before["out_proj.weight"], model.out_proj.weight)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_attention_without_heads_trains_and_decodes_on_cuda(dtype):
    from decoding import beam_search, greedy
    from train import DEFAULTS, train_step
    model, optimizer, rt, batches = tiny_on_cuda(dtype, enc_self_heads=[0], dec_cross_heads=[0])
    before = model.encoder[0].ff.up.weight.detach().clone()
    outs = [train_step(model, optimizer, batches, 0, DEFAULTS, rt) for _ in range(4)]
    assert "done" in [o["update"] for o in outs] and all(math.isfinite(o["loss"]) for o in outs)
    assert not torch.equal(before, model.encoder[0].ff.up.weight)
    model.eval()
    src = batches[0][0].cuda()
    with rt.amp:
        hyps = greedy(model, src, 1, 2, 0, 9)[0]
        beams = beam_search(model, src, 1, 2, 9, beam=1, alpha=0.0)
    assert [h[0][0] for h in beams] == [[t for t in row if t not in (0, 2)][:len(b[0][0])]
                                       for row, b in zip(hyps.tolist(), beams)]


def test_a_run_resumed_on_cuda_continues_the_uninterrupted_one(tmp_path):
    # a constant learning rate: the first half's max_iters=4 would otherwise give it another schedule
    common = [*TINY, "--device=cuda", "--max_iters=8", "--eval_interval=4", "--eval_sentences=5", "--dropout=0.1",
              "--warmup_frac=0", "--learning_rate=2e-3", "--min_lr=2e-3"]
    run("train.py", *common, f"--out_dir={tmp_path / 'straight'}")
    run("train.py", *common, f"--out_dir={tmp_path / 'resumed'}", "--max_iters=4")
    run("train.py", *common, f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume")
    straight, resumed = ({r["step"]: r["loss"] for r in train_records(tmp_path / d)} for d in ("straight", "resumed"))
    assert list(resumed) == list(range(1, 9))
    assert all(resumed[s] == pytest.approx(straight[s], rel=1e-4) for s in straight), (straight, resumed)


def test_bf16_follows_the_fp32_loss_curve_on_cuda(tmp_path):
    common = [*TINY, "--device=cuda", "--max_iters=200", "--eval_interval=200", "--log_interval=20",
              "--learning_rate=3e-3", "--dropout=0"]
    run("train.py", *common, "--dtype=float32", f"--out_dir={tmp_path / 'fp32'}")
    run("train.py", *common, "--dtype=bfloat16", f"--out_dir={tmp_path / 'bf16'}")
    fp32, bf16 = ([r["loss"] for r in train_records(tmp_path / d) if r["step"] >= 100] for d in ("fp32", "bf16"))
    assert all(abs(a - b) < 0.15 * a + 0.05 for a, b in zip(fp32, bf16)), (fp32, bf16)


def test_a_run_moves_from_cpu_to_cuda_and_back(tmp_path):
    common = [*TINY, f"--out_dir={tmp_path}", "--eval_interval=4", "--eval_sentences=5"]
    run("train.py", *common, "--device=cpu", "--max_iters=4")
    out = run("train.py", *common, "--init_from=resume", "--device=cuda", "--max_iters=8")
    assert "device cuda" in out.stdout
    run("train.py", *common, "--init_from=resume", "--device=cpu", "--max_iters=12")
    records = train_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_under_torchrun_match_one_gpu_accumulating(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT
    common = [*TINY, "--device=cuda", "--dropout=0.0", "--max_iters=5", "--eval_interval=5", "--eval_sentences=5",
              "--warmup_frac=0", "--learning_rate=2e-3", "--min_lr=2e-3"]
    run("train.py", *common, f"--out_dir={tmp_path / 'one'}", "--grad_accum=2")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *common, f"--out_dir={tmp_path / 'two'}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    one = {r["step"]: r["loss"] for r in train_records(tmp_path / "one")}
    two = {r["step"]: r["loss"] for r in train_records(tmp_path / "two")}
    assert all(two[s] == pytest.approx(one[s], rel=1e-3) for s in one)
