"""tools/bench.py: the loop bench runs train.py's loop, its learning-rate schedule included, under
either kind of budget; the step bench's fp16 rows scale the loss as train.py does under fp16."""
import json
import os

import pytest
import torch

from runtime import Runtime
from helpers import CACHE, ROOT, run
from tools import bench


def loop_lrs(tmp_path, extra_config: str) -> list[float]:
    """The learning rate of every turn of the loop bench on the toy config plus `extra_config` lines."""
    config = tmp_path / "toy.py"
    with open(os.path.join(ROOT, "config/toy_reverse.py")) as f:
        config.write_text(f.read() + f"cache_dir = {CACHE.split('=', 1)[1]!r}\n" + extra_config)
    out = tmp_path / "loop.json"
    run("tools/bench.py", "--bench=loop", f"--config={config}", "--device=cpu", "--dtype=float32", "--steps=3",
        "--warmup_steps=1", "--loop_rounds=1", "--repeats=1", f"--out_json={out}")
    return json.loads(out.read_text())["lrs"]


@pytest.mark.parametrize("budget", [pytest.param("max_iters = 600\n", marks=pytest.mark.slow, id="max_iters"),
                                    pytest.param("max_iters = 0\nmax_minutes = 0.5\n", id="max_minutes")])
def test_the_loop_bench_warms_the_learning_rate_up_as_train_py_does(tmp_path, budget):
    # under max_minutes the schedule's clock is runtime.advance_clock's: a loop that never moves it
    # trains every step at lr_at(0) = 0
    lrs = loop_lrs(tmp_path, budget)
    assert len(lrs) == 4 and lrs[0] == 0.0                    # 1 untimed + 3 timed turns; step 0 is at lr 0
    assert all(a < b for a, b in zip(lrs, lrs[1:])), lrs      # still warming up: it rises every step


def tiny_batch(pad: int = 0):
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(3, 20, (4, 7), generator=g), torch.randint(3, 20, (4, 6), generator=g)
    src[1, 5:] = pad
    return src, tgt[:, :-1], tgt[:, 1:]


@pytest.mark.parametrize("name", [bench.OURS, "torch.nn.Transformer"])
def test_the_fp16_step_bench_goes_through_the_grad_scaler(name):
    cfg = dict(src_vocab=20, tgt_vocab=20, pad_id=0, d_model=32, n_head=2, n_enc_layer=1, n_dec_layer=1, d_ff=64,
               dropout=0.0, attn_dropout=0.0, ff_dropout=0.0, pre_norm=True, attn_impl="math")
    train_cfg = dict(label_smoothing=0.1, grad_clip=1.0, grad_accum=1, overfit_batches=0, weight_decay=0.01)
    torch.manual_seed(0)
    model = bench.build(name, cfg, {}, 1, 2)
    # a scale so large that fp16 gradients overflow: the scaler skips the update and halves itself
    rt = Runtime("cpu", "float16", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 100))
    before = [p.detach().clone() for p in model.parameters()]
    out = bench.step(name, model, bench.make_optimizer(model, train_cfg), tiny_batch(), 0, train_cfg, rt)
    assert out["update"] in ("overflow", "skipped") and rt.scaler.get_scale() == 2.0 ** 99
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
