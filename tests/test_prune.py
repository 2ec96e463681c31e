"""prune.py: physical pruning equals gating, zero-head layers, keeping exactly K heads, the CLI end to end."""
import json
import os

import pytest
import torch

import prune
from checkpoint import RUN_FILES
from gates import attach_gates, eval_gates
from helpers import TINY, run, train_records
from model_transformer import Transformer, TransformerConfig

V, PAD = 20, 0


def tiny():
    torch.manual_seed(0)
    return Transformer(TransformerConfig(src_vocab=V, tgt_vocab=V, pad_id=PAD, d_model=32, n_head=4,
                                         n_enc_layer=2, n_dec_layer=2, d_ff=64, dropout=0.0), verbose=False)


def batch():
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, V, (3, 7), generator=g), torch.randint(3, V, (3, 6), generator=g)
    src[2, 5:] = PAD
    return src, tgt


def set_gates(gates, log_alphas):
    with torch.no_grad():
        for kind, layers in log_alphas.items():
            for g, values in zip(gates[kind], layers):
                g.log_alpha.copy_(torch.tensor(values))


@pytest.mark.parametrize("types", [["enc"], ["enc", "dec", "cross"]])
def test_pruned_model_computes_what_the_gated_model_computes(types):
    model = tiny()
    gates = attach_gates(model, types)
    # -9: closed (eval gate 0); 0.0: open at 0.5; 9: fully open. Layer 1 of enc loses every head.
    pattern = {"enc": [[9.0, -9.0, 0.0, -9.0], [-9.0, -9.0, -9.0, -9.0]],
               "dec": [[-9.0, 9.0, 9.0, 9.0], [0.5, -9.0, 9.0, 9.0]],
               "cross": [[9.0, 9.0, -9.0, 0.0], [9.0, 9.0, 9.0, 9.0]]}
    set_gates(gates, {k: pattern[k] for k in types})
    model.eval()
    src, tgt = batch()
    gated_out = model(src, tgt)
    pruned, keep = prune.prune_heads(model, eval_gates(gates))
    pruned.eval()
    assert keep["enc"] == [[0, 2], []]
    assert pruned.cfg.enc_self_heads == [2, 0]
    assert pruned.num_params() < model.num_params()
    assert torch.allclose(pruned(src, tgt), gated_out, atol=1e-5)
    # and the incremental decoder of the pruned model agrees with its full forward
    memory, cache = pruned.encode(src), None
    full = pruned(src, tgt)
    for t in range(tgt.shape[1]):
        step, cache = pruned.decode_step(tgt[:, t], memory, cache)
        assert torch.allclose(step, full[:, t], atol=1e-5)


PRUNE = ["--max_iters=20", "--eval_interval=10", "--eval_sentences=20", "--gate_lr=0.5",
         "--dtype=float32"]


@pytest.mark.slow      # ~17 s: gating, fine-tuning and sample.py
def test_prune_cli_end_to_end_and_sample_loads_the_result(toy_model, tmp_path):
    # gates, training with the penalty, removal, fine-tuning of the pruned model, report and plots
    out = run("prune.py", f"--ckpt={toy_model}", "--lambda=2", *PRUNE, f"--out_dir={tmp_path / 'p'}")
    assert "pruning report" in out.stdout
    report = json.load(open(tmp_path / "p" / "prune_report.json"))
    for name in ("gates.gif", "gates_final.png", "heads_vs_step.png", "pruned.pt", "test_translations.txt",
                 "log.jsonl", "finetune/log.jsonl"):
        assert os.path.exists(tmp_path / "p" / name), name
    assert sum(report["heads_kept"]["enc"]) < 8                   # some encoder heads are gone
    assert report["steps"] == report["finetune_steps"] == 20      # the fine-tuning as long as the gating
    assert report["params_after"] < report["params_before"]
    png = tmp_path / "attn.png"                                  # the decoder's cross-attention is intact
    sample = run("sample.py", f"--ckpt={tmp_path / 'p' / 'pruned.pt'}", "--text=1 2 3", "--beam=3",
                 f"--plot_attention={png}")
    assert len(sample.stdout.splitlines()) == 1 and png.exists()
    assert set(os.listdir(tmp_path / "p")) - {"run.lock"} <= set(RUN_FILES)   # all of it replaced by --overwrite
    pruned = (tmp_path / "p" / "pruned.pt").read_bytes()                       # a second run there: refused
    again = run("prune.py", f"--ckpt={toy_model}", "--lambda=1", *PRUNE, f"--out_dir={tmp_path / 'p'}", check=False)
    assert again.returncode == 2 and "--overwrite=True" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "p" / "pruned.pt").read_bytes() == pruned


@pytest.mark.slow      # ~25 s: 9 s of gating, 9 s of fine-tuning, six translations of two splits
def test_under_max_minutes_the_head_count_aimed_at_ramps_over_the_share_of_the_budget(toy_model, tmp_path):
    """--heads=2 of the 8 encoder heads in 0.15 minutes: the count aimed at falls from 8 to 2 over
    the first target_ramp = 0.5 of the budget, by the clock's share of it. (Minutes where the share
    is due would give a ramp 1 / 0.15 times too slow here, and one that ends after a minute in
    budgets over a minute.)"""
    budget, ramp = 0.15, 0.5
    run("prune.py", f"--ckpt={toy_model}", "--heads=2", "--max_iters=0", f"--max_minutes={budget}", "--log_interval=10",
        "--eval_interval=100000", "--eval_sentences=5", "--dtype=float32", f"--out_dir={tmp_path}")
    records = train_records(tmp_path)                            # the gating run's (the fine-tuning's: finetune/)
    aims = [r["aim"] for r in records]
    assert aims[0] > 2 + 1 and aims[-1] == 2                     # well above K early, K by the end
    assert all(a >= b for a, b in zip(aims, aims[1:]))
    for r in records:
        # prune.py's clock starts before the loop's (which the records' minutes read): ahead, never behind
        share = min(1.0, r["minutes"] / budget / ramp)
        assert r["aim"] <= 8 - 6 * share + 0.05, (r["step"], r["minutes"], r["aim"])


def test_keeping_k_heads_keeps_the_k_most_open_gates_and_a_closed_one_at_full_weight():
    gates = attach_gates(tiny(), ["enc", "cross"])
    set_gates(gates, {"enc": [[3.0, -9.0, 1.0, -9.0], [-9.0, -9.0, -8.0, -9.0]],
                      "cross": [[2.0, -9.0, -9.0, -9.0], [-9.0, -9.0, -9.0, 0.5]]})
    z = prune.kept_gates(gates, 5)
    kept = {kind: [[h for h in range(4) if v[h] > 0] for v in layers] for kind, layers in z.items()}
    assert kept == {"enc": [[0, 2], [2]], "cross": [[0], [3]]}
    assert z["enc"][1][2] == 1.0                                  # closed (log_alpha -8), kept at full weight
    assert z["enc"][0][0] == eval_gates(gates)["enc"][0][0]       # an open one keeps its value


def test_a_head_count_and_a_lambda_together_or_an_unknown_steer_are_refused():
    out = run("prune.py", "--heads=3", "--lambda=0.1", check=False)
    assert out.returncode == 2 and "give one of them" in out.stderr and "Traceback" not in out.stderr
    out = run("prune.py", "--heads=3", "--target_steer=spring", check=False)
    assert out.returncode == 2 and "use lagrangian or quadratic" in out.stderr and "Traceback" not in out.stderr
    out = run("prune.py", "--gate_attn=encoder", check=False)
    assert out.returncode == 2 and "gate_attn='encoder' is not known" in out.stderr


def test_several_processes_train_a_model_whose_attention_layers_were_pruned_away(tmp_path):
    """A layer with no heads left keeps empty weights (and, with pre-LN, a norm whose output
    nothing reads): averaging the gradients over processes (runtime.average_gradients, here in a
    1-process gloo group that takes the several-process path) must leave a parameter that no
    process gave a gradient without one, and train the rest."""
    import torch.distributed as dist

    import train
    from runtime import Runtime, average_gradients
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab=V, tgt_vocab=V, pad_id=PAD, d_model=32, n_head=4, n_enc_layer=2,
                                          n_dec_layer=2, d_ff=64, dropout=0.0, enc_self_heads=[2, 0],
                                          dec_self_heads=[0, 4], dec_cross_heads=[4, 0]), verbose=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rt = Runtime("cpu", "float32", rank=0, world_size=2)      # (2: the all_reduce path; the group has 1)
        optimizer = train.make_optimizer(model, train.DEFAULTS)
        rt.start(optimizer, train.DEFAULTS, None, train.RunState)
        src, tgt = batch()
        for _ in range(3):
            before = model.encoder[0].ff.up.weight.detach().clone()
            out = train.train_step(model, optimizer, [(src, tgt, tgt)], PAD, train.DEFAULTS, rt)
            assert out["update"] == "done" and not torch.equal(before, model.encoder[0].ff.up.weight)
        used, unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        used(torch.ones(1, 2)).sum().backward()
        own = used.weight.grad.clone()
        average_gradients(torch.nn.ModuleList([used, unused]), 2)   # the group's sum is this process's alone
        assert torch.equal(used.weight.grad, own / 2) and unused.weight.grad is None   # none made up
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pre_norm", [True, False])
def test_a_pruned_model_freezes_exactly_what_gets_no_gradient(pre_norm):
    """Built from its checkpoint config, a pruned model freezes the empty weights of an attention
    without heads (and, with pre-LN, the norm before it): the parameters a training step leaves at
    a zero gradient, so the optimizer holds no state for them, as in the runs that wrote earlier
    checkpoints."""
    from checkpoint import model_of
    cfg = dict(src_vocab=V, tgt_vocab=V, pad_id=PAD, d_model=32, n_head=4, n_enc_layer=2, n_dec_layer=2, d_ff=64,
               dropout=0.0, pre_norm=pre_norm, enc_self_heads=[2, 0], dec_self_heads=[0, 4], dec_cross_heads=[4, 0])
    torch.manual_seed(0)
    plain = Transformer(TransformerConfig(**cfg), verbose=False)
    src, tgt = batch()
    plain(src, tgt).logsumexp(-1).sum().backward()
    no_gradient = {n for n, p in plain.named_parameters() if not p.grad.any()}
    frozen = {n for n, p in model_of("transformer", cfg).named_parameters() if not p.requires_grad}
    assert frozen == no_gradient and "encoder.1.self_attn.out_proj.bias" not in frozen
    assert ("encoder.1.res_attn.norm.weight" in frozen) == pre_norm


@pytest.mark.slow      # ~10 s: torchrun with two processes
def test_under_torchrun_prune_refuses_in_one_line_before_writing_anything(toy_model, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT
    out_dir = tmp_path / "pruned"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "prune.py", f"--ckpt={toy_model}", f"--out_dir={out_dir}", "--max_iters=4"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("prune.py runs in one process, and torchrun started 2" in e for e in errors), out.stderr
    assert not out_dir.exists()                     # (torchrun's own traceback follows: its child failed)
