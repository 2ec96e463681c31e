"""tools/prune_study.py: prune.py's runs against baselines at the same head count, p-values, run
reuse, sweeps, distillation."""
import json
import os

import pytest

from helpers import run
from tools import prune_study


def test_lambda_parsing():
    assert prune_study.parse_numbers("0.05", "lambda", float, 0, 100) == [0.05]
    assert prune_study.parse_numbers("0.01, 0.1", "lambda", float, 0, 100) == [0.01, 0.1]
    for bad in ("-1", "abc", "", "1e9"):
        with pytest.raises(Exception, match="--lambda"):
            prune_study.parse_numbers(bad, "lambda", float, 0, 100)
    assert prune_study.parse_numbers("10,6,3", "heads", int) == [10, 6, 3]
    with pytest.raises(Exception, match="--heads=2.5"):
        prune_study.parse_numbers("2.5", "heads", int)



PRUNE = ["--max_iters=20", "--eval_interval=10", "--eval_sentences=20", "--speed_repeats=1", "--gate_lr=0.5",
         "--dtype=float32"]


@pytest.mark.slow      # ~27 s: four pruning runs
def test_the_study_compares_l0_with_a_baseline_and_the_control(toy_model, tmp_path):
    # l0 with a lambda (gates, removal, fine-tuning), then the importance baseline at the head
    # count l0 kept, and the unpruned control trained as long as the l0 run, all compared
    out = run("tools/prune_study.py", f"--ckpt={toy_model}", "--lambda=2", "--method=l0,importance,unpruned", *PRUNE,
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


@pytest.mark.slow      # ~20 s: six runs
def test_asking_for_k_heads_keeps_exactly_k_with_every_method(toy_model, tmp_path):
    # (l0 without the fine-tuning after removal: its pruned model scores what its gated model does)
    run("tools/prune_study.py", f"--ckpt={toy_model}", "--heads=3", "--method=l0,importance,random", "--seeds=1,2",
        "--l0_finetune=False", *PRUNE, f"--out_dir={tmp_path / 'p'}")
    runs = json.load(open(tmp_path / "p" / "prune_summary.json"))["runs"]
    assert runs[0]["gated_test"]["bleu"] == pytest.approx(runs[0]["pruned_test"]["bleu"], abs=1e-6)
    assert "finetune_steps" not in runs[0]
    assert [(r["method"], r.get("seed")) for r in runs] == [("l0", None), ("importance", None), ("random", 1),
                                                             ("random", 2)]
    assert all(sum(r["heads_kept"]["enc"]) == 3 for r in runs)
    assert runs[2]["kept_heads_index"]["enc"] != runs[3]["kept_heads_index"]["enc"]   # two draws
    # a third seed asked later: the four finished runs are reused, only the new one runs
    again = run("tools/prune_study.py", f"--ckpt={toy_model}", "--heads=3", "--method=l0,importance,random", "--seeds=1,2,3",
                "--l0_finetune=False", *PRUNE, f"--out_dir={tmp_path / 'p'}")
    assert again.stdout.count("finished before with the same settings") == 4
    assert again.stdout.count("== pruning report") == 1
    runs_again = json.load(open(tmp_path / "p" / "prune_summary.json"))["runs"]
    assert [r["pruned_test"]["bleu"] for r in runs_again[:4]] == [r["pruned_test"]["bleu"] for r in runs]
    # other settings are another run: it may replace the finished ones only when told to
    other = ["tools/prune_study.py", f"--ckpt={toy_model}", "--heads=3", "--method=importance,random", "--seeds=1",
             "--max_iters=10", *PRUNE[1:], f"--out_dir={tmp_path / 'p'}"]
    importance = (tmp_path / "p" / "importance_3_heads" / "pruned.pt").read_bytes()
    refused = run(*other, check=False)
    assert refused.returncode == 2 and "it has other settings or did not finish" in refused.stderr
    assert (tmp_path / "p" / "importance_3_heads" / "pruned.pt").read_bytes() == importance
    replaced = run(*other, "--overwrite=True")
    assert "finished before" not in replaced.stdout and replaced.stdout.count("== pruning report") == 2
    # the quadratic steer is another l0 run, and it too keeps exactly K
    run("tools/prune_study.py", f"--ckpt={toy_model}", "--heads=3", "--target_steer=quadratic", "--l0_finetune=False", *PRUNE,
        f"--out_dir={tmp_path / 'p'}")
    quadratic = json.load(open(tmp_path / "p" / "prune_report.json"))
    assert quadratic["settings"]["target_steer"] == "quadratic" and sum(quadratic["heads_kept"]["enc"]) == 3


@pytest.mark.slow      # ~12 s: two lambdas, decoder heads gated too
def test_prune_sweep_draws_the_tradeoff_and_refuses_to_plot_absent_heads(toy_model, tmp_path):
    out = run("tools/prune_study.py", f"--ckpt={toy_model}", "--lambda=0.5,2", *PRUNE, f"--out_dir={tmp_path / 'p'}",
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


def test_distill_trains_on_the_original_models_translations_made_once(toy_model, tmp_path, monkeypatch):
    from checkpoint import load_checkpoint, model_from_checkpoint
    from data import data_of_checkpoint
    from runtime import setup
    source = load_checkpoint(str(toy_model))
    data, rt, model = data_of_checkpoint(source, ""), setup("cpu", "float32"), model_from_checkpoint(source)[0]
    sp, calls = data.splits["train"], []

    def original_translates(model, src_tok, tgt_tok, sentences, beam, **kwargs):   # every third one: nothing
        calls.append((type(model).__name__, beam))
        return ["" if i % 3 == 0 else s[::-1] + " x" for i, s in enumerate(sentences)]

    monkeypatch.setattr(prune_study, "translate", original_translates)
    distilled = prune_study.distilled(data, model, str(toy_model), str(tmp_path), rt)
    train = distilled.splits["train"]
    assert calls == [("Transformer", 5)]
    assert len(train) == len(sp) - (len(sp) + 2) // 3                  # the empty translations are left out
    assert train.src_text[:2] == [sp.src_text[1], sp.src_text[2]]      # sources and targets stay aligned
    assert train.tgt_text[:2] == [sp.src_text[1][::-1] + " x", sp.src_text[2][::-1] + " x"]
    assert list(train.tgt(1)) == data.tgt_tok.encode(train.tgt_text[1]) and list(train.src(1)) == list(sp.src(2))
    assert distilled.splits["validation"] is data.splits["validation"]   # only the training targets change
    assert prune_study.distilled(data, model, str(toy_model), str(tmp_path), rt).splits["train"].tgt_text == \
        train.tgt_text and len(calls) == 1                                # read back from the file
    with pytest.raises(prune_study.ConfigError, match="translations of another checkpoint"):
        prune_study.distilled(data, model, str(tmp_path / "other.pt"), str(tmp_path), rt)   # not used, not replaced
    prune_study.distilled(data, model, str(tmp_path / "other.pt"), str(tmp_path), rt, overwrite=True)
    assert len(calls) == 2                                               # translated anew
    monkeypatch.setattr(prune_study, "translate", lambda model, s, t, sentences, **kw: [" "] * len(sentences))
    with pytest.raises(prune_study.DataError, match="translates every training source to nothing"):
        prune_study.distilled(data, model, str(tmp_path / "third.pt"), str(tmp_path), rt, overwrite=True)
