"""prune.py: physical pruning equals gating, zero-head layers, the CLI end to end."""
import json
import os

import pytest
import torch

import prune
from checkpoint import attach_gates
from gates import eval_gates
from helpers import TINY, run
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


def test_lambda_parsing():
    assert prune.parse_numbers("0.05", "lambda", float, 0, 100) == [0.05]
    assert prune.parse_numbers("0.01, 0.1", "lambda", float, 0, 100) == [0.01, 0.1]
    for bad in ("-1", "abc", "", "1e9"):
        with pytest.raises(Exception, match="--lambda"):
            prune.parse_numbers(bad, "lambda", float, 0, 100)
    assert prune.parse_numbers("10,6,3", "heads", int) == [10, 6, 3]
    with pytest.raises(Exception, match="--heads=2.5"):
        prune.parse_numbers("2.5", "heads", int)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A tiny Transformer trained for 30 steps on toy:reverse (4 heads per attention module)."""
    out_dir = tmp_path_factory.mktemp("toy")
    run("train.py", *TINY, "--n_head=4", "--n_dec_layer=1", "--max_iters=30", "--eval_interval=30",
        "--eval_sentences=20", f"--out_dir={out_dir}")
    return out_dir / "best.pt"


PRUNE = ["--max_iters=20", "--eval_interval=10", "--eval_sentences=20", "--speed_repeats=1", "--gate_lr=0.5",
         "--dtype=float32"]


def test_prune_cli_end_to_end_and_sample_loads_the_result(toy_model, tmp_path):
    # l0 with a lambda (gates, removal, fine-tuning), then the importance baseline at the head
    # count l0 kept, and the unpruned control trained as long as the l0 run, all compared
    out = run("prune.py", f"--ckpt={toy_model}", "--lambda=2", "--method=l0,importance,unpruned", *PRUNE,
              f"--out_dir={tmp_path / 'p'}")
    assert "pruning report" in out.stdout and "the runs compared on the test split" in out.stdout
    report = json.load(open(tmp_path / "p" / "lambda_2" / "prune_report.json"))
    for name in ("gates.gif", "gates_final.png", "heads_vs_step.png", "pruned.pt", "test_translations.txt",
                 "finetune/log.jsonl"):
        assert os.path.exists(tmp_path / "p" / "lambda_2" / name), name
    k = sum(report["heads_kept"]["enc"])
    assert k < 8                                                 # some encoder heads are gone
    baseline = json.load(open(tmp_path / "p" / f"importance_{k}_heads" / "prune_report.json"))
    assert sum(baseline["heads_kept"]["enc"]) == k
    assert baseline["steps"] == report["finetune_steps"] == 20   # the same fine-tuning after removal
    summary = json.load(open(tmp_path / "p" / "prune_summary.json"))
    assert [r["run"] for r in summary["comparison"]] == ["unpruned", "l0, lambda 2", "importance"]
    assert 0 < summary["comparison"][2]["vs_l0"]["p_value"] <= 1
    assert all(0 < row["vs_unpruned"]["p_value"] <= 1 for row in summary["comparison"][1:])
    control = json.load(open(tmp_path / "p" / "unpruned" / "prune_report.json"))
    assert control["heads"] == 8 and control["params_after"] == control["params_before"]
    assert control["steps"] == report["steps"] + report["finetune_steps"] == 40   # as long as the l0 run
    assert set(summary["roles"]) >= {"confidence", "positional", "rare_token"}
    assert os.path.exists(tmp_path / "p" / f"heads_{k}.png") and os.path.exists(tmp_path / "p" / "tradeoff.png")
    png = tmp_path / "attn.png"                                  # the decoder's cross-attention is intact
    sample = run("sample.py", f"--ckpt={tmp_path / 'p' / 'lambda_2' / 'pruned.pt'}", "--text=1 2 3", "--beam=3",
                 f"--plot_attention={png}")
    assert len(sample.stdout.splitlines()) == 1 and png.exists()


def test_a_head_count_and_a_lambda_together_or_an_unknown_steer_are_refused():
    out = run("prune.py", "--heads=3", "--lambda=0.1", check=False)
    assert out.returncode == 2 and "give one of them" in out.stderr and "Traceback" not in out.stderr
    out = run("prune.py", "--heads=3", "--target_steer=spring", check=False)
    assert out.returncode == 2 and "use lagrangian or quadratic" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow      # ~20 s: six runs
def test_asking_for_k_heads_keeps_exactly_k_with_every_method(toy_model, tmp_path):
    # (l0 without the fine-tuning after removal: its pruned model scores what its gated model does)
    run("prune.py", f"--ckpt={toy_model}", "--heads=3", "--method=l0,importance,random", "--seeds=1,2",
        "--l0_finetune=False", *PRUNE, f"--out_dir={tmp_path / 'p'}")
    runs = json.load(open(tmp_path / "p" / "prune_summary.json"))["runs"]
    assert runs[0]["gated_test"]["bleu"] == pytest.approx(runs[0]["pruned_test"]["bleu"], abs=1e-6)
    assert "finetune_steps" not in runs[0]
    assert [(r["method"], r.get("seed")) for r in runs] == [("l0", None), ("importance", None), ("random", 1),
                                                             ("random", 2)]
    assert all(sum(r["heads_kept"]["enc"]) == 3 for r in runs)
    assert runs[2]["kept_heads_index"]["enc"] != runs[3]["kept_heads_index"]["enc"]   # two draws
    # a third seed asked later: the four finished runs are reused, only the new one runs
    again = run("prune.py", f"--ckpt={toy_model}", "--heads=3", "--method=l0,importance,random", "--seeds=1,2,3",
                "--l0_finetune=False", *PRUNE, f"--out_dir={tmp_path / 'p'}")
    assert again.stdout.count("finished before with the same settings") == 4
    assert again.stdout.count("== pruning report") == 1
    runs_again = json.load(open(tmp_path / "p" / "prune_summary.json"))["runs"]
    assert [r["pruned_test"]["bleu"] for r in runs_again[:4]] == [r["pruned_test"]["bleu"] for r in runs]
    # other settings are another run
    other = run("prune.py", f"--ckpt={toy_model}", "--heads=3", "--method=importance,random", "--seeds=1",
                "--max_iters=10", *PRUNE[1:], f"--out_dir={tmp_path / 'p'}")
    assert "finished before" not in other.stdout and other.stdout.count("== pruning report") == 2
    # the quadratic steer is another l0 run, and it too keeps exactly K
    run("prune.py", f"--ckpt={toy_model}", "--heads=3", "--target_steer=quadratic", "--l0_finetune=False", *PRUNE,
        f"--out_dir={tmp_path / 'p'}")
    quadratic = json.load(open(tmp_path / "p" / "prune_report.json"))
    assert quadratic["settings"]["target_steer"] == "quadratic" and sum(quadratic["heads_kept"]["enc"]) == 3


@pytest.mark.slow      # ~12 s: two lambdas, decoder heads gated too
def test_prune_sweep_draws_the_tradeoff_and_refuses_to_plot_absent_heads(toy_model, tmp_path):
    out = run("prune.py", f"--ckpt={toy_model}", "--lambda=0.5,2", *PRUNE, f"--out_dir={tmp_path / 'p'}",
              "--gate_attn=enc,cross")
    assert "trade-off plot" in out.stdout and os.path.exists(tmp_path / "p" / "tradeoff.png")
    report = json.load(open(tmp_path / "p" / "lambda_2" / "prune_report.json"))
    assert report["heads_kept"]["cross"] != [4]                 # some cross-attention heads are gone
    for lam in ("0.5", "2"):
        kept = json.load(open(tmp_path / "p" / f"lambda_{lam}" / "prune_report.json"))["heads_kept"]["cross"]
        png = tmp_path / f"attn_{lam}.png"
        plot = run("sample.py", f"--ckpt={tmp_path / 'p' / f'lambda_{lam}' / 'pruned.pt'}", "--text=1 2 3",
                   f"--plot_attention={png}", check=False)
        if sum(kept):                                            # heads left to draw: one panel each
            assert plot.returncode == 0 and png.exists(), plot.stderr
        else:                                                    # all gone: a clear refusal, not a crash
            assert plot.returncode == 2 and "cross-attention heads were all pruned" in plot.stderr


def test_ddp_trains_a_model_whose_attention_layers_were_pruned_away(tmp_path):
    """A layer with no heads left keeps empty weights (and, with pre-LN, a norm whose output
    nothing reads): DDP fails at its second step when a trainable parameter gets no gradient."""
    import torch.distributed as dist

    import train
    from optimizers import make_optimizer
    from runtime import Runtime
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab=V, tgt_vocab=V, pad_id=PAD, d_model=32, n_head=4, n_enc_layer=2,
                                          n_dec_layer=2, d_ff=64, dropout=0.0, enc_self_heads=[2, 0],
                                          dec_self_heads=[0, 4], dec_cross_heads=[4, 0]), verbose=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        rt = Runtime("cpu", "float32", rank=0, world_size=1)
        optimizer = make_optimizer(model, train.DEFAULTS)
        src, tgt = batch()
        for _ in range(3):
            out = train.train_step(wrapped, optimizer, None, [(src, tgt, tgt)], PAD, train.DEFAULTS, rt)
            assert out["update"] == "done"
    finally:
        dist.destroy_process_group()


def test_distill_trains_on_the_original_models_translations_made_once(toy_model, tmp_path, monkeypatch):
    from checkpoint import data_of_checkpoint, load_checkpoint, model_from_checkpoint
    from runtime import setup
    source = load_checkpoint(str(toy_model))
    data, rt, model = data_of_checkpoint(source, ""), setup("cpu", "float32"), model_from_checkpoint(source)[0]
    sp, calls = data.splits["train"], []

    def original_translates(model, src_tok, tgt_tok, sentences, beam, **kwargs):   # every third one: nothing
        calls.append((type(model).__name__, beam))
        return ["" if i % 3 == 0 else s[::-1] + " x" for i, s in enumerate(sentences)]

    monkeypatch.setattr(prune, "translate", original_translates)
    distilled = prune.distilled(data, model, str(toy_model), str(tmp_path), rt)
    train = distilled.splits["train"]
    assert calls == [("Transformer", 5)]
    assert len(train) == len(sp) - (len(sp) + 2) // 3                  # the empty translations are left out
    assert train.src_text[:2] == [sp.src_text[1], sp.src_text[2]]      # sources and targets stay aligned
    assert train.tgt_text[:2] == [sp.src_text[1][::-1] + " x", sp.src_text[2][::-1] + " x"]
    assert list(train.tgt(1)) == data.tgt_tok.encode(train.tgt_text[1]) and list(train.src(1)) == list(sp.src(2))
    assert distilled.splits["validation"] is data.splits["validation"]   # only the training targets change
    assert prune.distilled(data, model, str(toy_model), str(tmp_path), rt).splits["train"].tgt_text == \
        train.tgt_text and len(calls) == 1                                # read back from the file
    prune.distilled(data, model, str(tmp_path / "other.pt"), str(tmp_path), rt)
    assert len(calls) == 2                                               # another checkpoint's file is not used
    monkeypatch.setattr(prune, "translate", lambda model, s, t, sentences, **kw: [" "] * len(sentences))
    with pytest.raises(prune.DataError, match="translates every training source to nothing"):
        prune.distilled(data, model, str(tmp_path / "third.pt"), str(tmp_path), rt)
