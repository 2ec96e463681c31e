"""
Prune attention heads, and check the choice against the simple alternatives:

    python prune.py --lambda=0.05                                      # L0 gates, transformer_en_it's model
    python prune.py --ckpt=out/multi30k/best.pt --lambda=0.05,0.07,0.1 # a sweep: the trade-off curve
    python prune.py --ckpt=out/multi30k/best.pt --heads=6              # ask for 6 heads instead of a lambda
    python prune.py --ckpt=out/multi30k/best.pt --heads=10,6,3 --method=l0,importance,random --seeds=1,2,3
    python prune.py --ckpt=out/multi30k/best.pt --gate_attn=enc,dec,cross --heads=21 --distill=True --method=l0,unpruned

method l0 (Voita et al. 2019, with the hard-concrete gates of Louizos et al. 2018 and their penalty, gates.py):
a gate on every head of the chosen attention types; model + gates fine-tuned on cross-entropy +
lambda * L0 with train.py's own loop, L0 = the expected number of open heads, summed over the
heads of a layer and averaged over the gated layers (so closing one head saves lambda divided
by the number of gated layers); then the closed heads are removed physically (rows of
q/k/v_proj, columns of out_proj), and (l0_finetune) the pruned model is fine-tuned for another
run's budget. With --heads=K, Lagrange multipliers replace lambda and steer the expected count
to K (Wang et al. 2020; --target_steer=quadratic: a one-sided quadratic penalty instead), and
the K most open heads are kept. The baselines, at the same K and with the same fine-tuning
budget after removal: importance (Michel et al. 2019, heads.py) and random (one run per seed).
The control, unpruned: the original model with every head, trained on as long as an l0 run
trains, which tells what pruning costs from what the extra training does.
Every run ends as a normal checkpoint (pruned.pt) that sample.py and train.py load. Reported:
heads kept, parameters, greedy BLEU (validation, test), decoding speed (l0), what each head of
the original model does (heads.py: heads_K.png), and between the runs paired-bootstrap p-values.
Leaves out: pruning feed-forward units or whole layers, iterative pruning.
"""

import json
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch

import heads as head_analysis
from checkpoint import (attach_gates, build_model, checkpoint_of, data_of_checkpoint, load_checkpoint,
                        model_from_checkpoint, save_checkpoint)
from configurator import ConfigError, configure, knob_names, main_guard
from data import DataError, Split
from decoding import length_sorted_batches, paired_bootstrap, score, translate
from gates import STEERS, L0Penalty, eval_gates
from runtime import Runtime, setup
from train import run_progress, train_loop

# -----------------------------------------------------------------------------
ckpt = "out/transformer_en_it/best.pt"  # the trained Transformer checkpoint to prune
out_dir = ""  # run folder ('' = <checkpoint folder>/prune_<gate_attn>)
method = "l0"  # 'l0' (gates), 'importance' (Michel et al.), 'random', 'unpruned' (the control); comma-separated
l0_lambda = "0.05"  # l0: penalty weight, --lambda=...; a comma-separated list runs a sweep
heads = ""  # keep exactly K heads of the pruned types (comma-separated Ks); '' = as many as the l0 runs keep
target_ramp = 0.5  # --heads: share of an l0 run over which the head count aimed at falls from all heads to K
target_steer = "lagrangian"  # --heads: how l0 steers the count to K: 'lagrangian' or 'quadratic' (gates.L0Penalty)
l0_finetune = True  # l0: fine-tune after removal for the baselines' budget (False: gated training only, as Voita)
distill = False  # train every method on the original model's beam-5 translations of the training sources
seeds = "1,2,3"  # random: one run per seed
gate_attn = "enc"  # attention types to prune, comma-separated: enc, dec, cross
dataset = ""  # a local folder to read instead of the checkpoint's dataset (no network)
learning_rate = 2e-4  # peak learning rate of the model weights while gating or fine-tuning
gate_lr = 0.05  # learning rate of the gate logits (they must travel far: ~5 units in log-odds)
warmup_frac = 0.05  # share of the run spent warming up
max_iters = 0  # optimizer steps per run (0 = use max_minutes)
max_minutes = 8.0  # wall-clock budget per run
log_interval = 50  # steps between log lines
eval_interval = 200  # steps between validation BLEU evaluations
eval_sentences = 500  # validation sentences decoded while training (0 = all)
importance_batches = 100  # importance: training batches the score is summed over
roles = True  # measure what each head of the original model does (validation split) and draw heads.png
speed_repeats = 3  # l0: decoding speed, original and pruned in turns, median of this many (0 = not measured)
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'bfloat16', 'float16', 'float32'
seed = 1337  # seeds each run's fine-tuning (gate noise, dropout, batch order) and the importance score's batches
# -----------------------------------------------------------------------------
KNOBS = knob_names(globals())


def parse_numbers(text: str, knob: str, kind=float, low: float = 0, high: float = float("inf")) -> list:
    """'0.05,0.1' -> [0.05, 0.1]: a comma-separated knob, each value of `kind` in [low, high)."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{knob}={text}: give {kind.__name__} values, comma-separated, like 1,2") from None
    if not values or any(not low <= v < high for v in values):
        raise ConfigError(f"--{knob}={text}: give at least one value, each >= {low:g} and < {high:g}")
    return values


def prune_heads(model, gate_values: dict):
    """A new Transformer without the closed heads, computing exactly what the gated model computes.

    For each gated attention module with eval gates z (H,): keep heads with z > 0, slice their
    rows of q/k/v_proj and their columns of out_proj, and fold z into those columns
    (out_proj(z_h * head_h) = (out_proj columns * z_h) head_h). No head left: out_proj is empty
    and the module returns its bias, as the gated module does with all gates at 0.
    """
    cfg = asdict(model.cfg)
    modules = model.attention_modules()
    keep = {kind: [[h for h in range(m.n_head) if kind not in gate_values or gate_values[kind][i][h] > 0]
                   for i, m in enumerate(modules[kind])] for kind in modules}
    cfg.update(enc_self_heads=[len(k) for k in keep["enc"]], dec_self_heads=[len(k) for k in keep["dec"]],
               dec_cross_heads=[len(k) for k in keep["cross"]])
    pruned = build_model(model.kind, cfg, verbose=False)
    state = {k: v for k, v in model.state_dict().items() if "head_gate" not in k}
    prefix = {id(m): name for name, m in model.named_modules()}
    for kind in modules:
        for i, old in enumerate(modules[kind]):
            Dh = old.head_dim
            kept = keep[kind][i]
            rows = torch.tensor([h * Dh + j for h in kept for j in range(Dh)], dtype=torch.long)
            z = gate_values[kind][i] if kind in gate_values else torch.ones(old.n_head)
            scale = z[kept].repeat_interleave(Dh) if kept else torch.ones(0)
            name = prefix[id(old)]
            for proj in ("q_proj", "k_proj", "v_proj"):
                state[f"{name}.{proj}.weight"] = getattr(old, proj).weight.detach()[rows]
                state[f"{name}.{proj}.bias"] = getattr(old, proj).bias.detach()[rows]
            state[f"{name}.out_proj.weight"] = old.out_proj.weight.detach()[:, rows] * scale
    pruned.load_state_dict(state)
    return pruned, keep


def finetune(model, source: dict, data, opts: dict, run_dir: str, rt: Runtime, penalty=None) -> int:
    """Train a gated or a pruned model with train.py's loop for one run's budget: the original
    run's data, batches, dropout and smoothing, with pruning's seed, learning rate and limits,
    AdamW (pruning's learning rates are sized for it), no early stopping, no averaging. Returns
    the steps taken."""
    cfg = {**source["train_config"], "init_from": opts["ckpt"], "out_dir": run_dir, "overfit_batches": 0,
           "optimizer": "adamw", "seed": opts["seed"], "patience": 0, "average_last": 0, **run_limits(opts),
           **{k: opts[k] for k in ("learning_rate", "warmup_frac", "log_interval", "eval_interval", "eval_sentences",
                                   "device", "dtype")}}
    return train_loop(model, data, cfg, rt, penalty=penalty).step


def distilled(data, model, ckpt_path: str, base: str, rt: Runtime):
    """data with the training targets replaced by the original model's (`model`, loaded from
    ckpt_path) beam-5 translations of the training sources: sequence-level knowledge distillation
    (Kim & Rush 2016). A pruned model learns to say what the original said, an easier target for
    a smaller model than the varied human references, and one the original already meets.
    Translated once (4.5 minutes for Multi30k on a 2-core CPU) into base/distilled_train.jsonl and
    reused by later runs; pairs whose translation came out empty are left out."""
    sp, path = data.splits["train"], os.path.join(base, "distilled_train.jsonl")
    stamp = {"ckpt": os.path.abspath(ckpt_path), "sentences": len(sp)}
    try:
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        hyps = lines[1:] if lines and lines[0] == stamp else None
    except (OSError, ValueError):
        hyps = None
    if hyps is None or len(hyps) != len(sp):
        print(f"\n== distill: translating the {len(sp):,} training sources with the original model, beam 5")
        t0 = time.time()
        hyps = translate(model, data.src_tok, data.tgt_tok, sp.src_text, beam=5, device=rt.device, amp=rt.amp)
        print(f"distill: {time.time() - t0:.0f}s; written to {path}")
        os.makedirs(base, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:          # complete, or not there at all
            f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [stamp] + hyps))
        os.replace(path + ".tmp", path)
    keep = [i for i, h in enumerate(hyps) if h.strip()]
    if not keep:
        raise DataError(f"{ckpt_path} translates every training source to nothing: nothing to distill from")
    targets = [hyps[i] for i in keep]
    train = Split([sp.src(i) for i in keep], data.tgt_tok.encode_batch(targets), [sp.src_text[i] for i in keep],
                  targets)
    return replace(data, splits={**data.splits, "train": train})


def run_limits(opts: dict) -> dict:
    """One run's stop conditions for train_loop: max_iters steps if set, else max_minutes."""
    return {"max_iters": opts["max_iters"], "max_epochs": 0.0,
            "max_minutes": 0.0 if opts["max_iters"] else opts["max_minutes"]}


@torch.no_grad()
def translate_split(model, data, split: str, rt: Runtime) -> dict:
    """Greedy translations of a whole split and their scores: bleu, bleu_lc, chrf, hyps."""
    sp = data.splits[split]
    hyps = translate(model, data.src_tok, data.tgt_tok, sp.src_text, device=rt.device, amp=rt.amp)
    s = score(hyps, sp.tgt_text)
    return {"bleu": s["bleu"], "bleu_lc": s["bleu_lc"], "chrf": s["chrf"], "hyps": hyps}


def run_l0(source: dict, data, opts: dict, run_dir: str, rt: Runtime, lam: float = 0.0,
           target: int | None = None) -> tuple:
    """Gate, train, prune, and (l0_finetune) fine-tune: (pruned model, keep-set, report). Every
    kept head keeps its gate value folded into out_proj, so the pruned model computes what the
    gated one does. With a lambda, the heads whose deterministic gate is above 0 are kept; with a
    target, the K most open gates (largest log_alpha), and should one of them have closed (fewer
    than K ended open), it is kept at full weight. The fine-tuning after removal gets the budget
    a baseline gets, so every method ends with the same training of its final heads."""
    model, _, _ = model_from_checkpoint(source)
    gates = attach_gates(model, opts["gate_types"])
    model.to(rt.device)                                  # with its new gates
    limits, start = run_limits(opts), time.perf_counter()

    def progress() -> float:                   # how far through the run, as the learning-rate schedule sees it
        return run_progress(penalty.steps, 0.0, (time.perf_counter() - start) / 60, limits)

    penalty = L0Penalty(gates, lam, opts["gate_lr"] / opts["learning_rate"], target, progress, opts["target_ramp"],
                        opts["target_steer"])
    what = f"lambda {lam:g}" if target is None else f"a target of {target} heads"
    print(f"\n== l0, {what}: gating {', '.join(opts['gate_types'])} heads ({model.num_params() / 1e6:.2f}M parameters)")
    penalty.log(0)
    steps = finetune(model, source, data, opts, run_dir, rt, penalty)
    penalty.log(steps)
    model.eval()
    report = {"method": "l0", "steps": steps, "gated_validation": translate_split(model, data, "validation", rt),
              "gated_test": translate_split(model, data, "test", rt), **({"lambda": lam} if target is None else {})}
    z = {k: [zi.cpu() for zi in v] for k, v in eval_gates(gates).items()}
    report["gate_values"] = {k: [zi.tolist() for zi in v] for k, v in z.items()}
    if target is not None:
        log_alpha = {kind: [g.log_alpha.detach().cpu() for g in layers] for kind, layers in gates.items()}
        n_heads = head_analysis.head_counts(model)
        chosen = head_analysis.gate_values(n_heads, head_analysis.top_k_heads(n_heads, log_alpha, target))
        z = {k: [torch.where(c > 0, torch.where(zi > 0, zi, 1.0), 0.0) for c, zi in zip(chosen[k], z[k])] for k in z}
    pruned, keep = prune_heads(model.cpu(), z)
    report["plots"] = head_analysis.plot_gates(run_dir, penalty.history, opts["gate_types"], model.cfg.n_head)
    if opts["l0_finetune"]:
        print(f"\n== l0: {heads_kept(keep, opts['gate_types'])} heads kept, then fine-tuned like the baselines")
        finetune_dir = os.path.join(run_dir, "finetune")                      # its own log and checkpoints
        os.makedirs(finetune_dir, exist_ok=True)
        report["finetune_steps"] = finetune(pruned.to(rt.device), source, data, opts, finetune_dir, rt)
    return pruned, keep, report


def run_baseline(keep: dict, method: str, seed: int | None, source: dict, data, opts: dict, run_dir: str,
                 rt: Runtime) -> tuple:
    """Remove all heads but those of `keep` from the original model, then fine-tune it for the
    same budget as an l0 run: (pruned model, keep-set, report). seed: the random draw's, or None."""
    model, _, _ = model_from_checkpoint(source)
    pruned, keep = prune_heads(model, head_analysis.gate_values(head_analysis.head_counts(model), keep))
    print(f"\n== {method}: {heads_kept(keep, opts['gate_types'])} {'+'.join(opts['gate_types'])} heads kept, "
          f"then fine-tuned")
    steps = finetune(pruned.to(rt.device), source, data, opts, run_dir, rt)
    return pruned, keep, {"method": method, "steps": steps, **({"seed": seed} if seed is not None else {})}


def run_unpruned(source: dict, data, opts: dict, run_dir: str, rt: Runtime) -> tuple:
    """The control: the original model, every head kept, trained on for as many steps as an l0
    run trains (gating, then with l0_finetune a second run's budget, as the fine-tuning after
    removal): (model, keep-set of all heads, report)."""
    model, _, _ = model_from_checkpoint(source)
    keep = {kind: [list(range(n)) for n in counts] for kind, counts in head_analysis.head_counts(model).items()}
    print(f"\n== unpruned: all {heads_kept(keep, opts['gate_types'])} heads, trained on as long as an l0 run")
    model.to(rt.device)
    steps = finetune(model, source, data, opts, run_dir, rt)
    if opts["l0_finetune"]:
        os.makedirs(os.path.join(run_dir, "finetune"), exist_ok=True)
        steps += finetune(model, source, data, opts, os.path.join(run_dir, "finetune"), rt)
    return model, keep, {"method": "unpruned", "steps": steps}


def heads_kept(keep: dict, kinds: list[str]) -> int:
    return sum(len(k) for kind in kinds for k in keep[kind])


def finish(pruned, keep: dict, report: dict, original: dict, source: dict, data, opts: dict, run_dir: str,
           rt: Runtime, settings: dict) -> dict:
    """Score the pruned model, measure its speed (l0), save it as pruned.pt with its report
    (prune_report.json, written last: its presence marks a finished run)."""
    pruned.to(rt.device).eval()
    report.update(heads=heads_kept(keep, opts["gate_types"]), gate_attn=opts["gate_types"],
                  original_validation=original["validation"], original_test=original["test"],
                  params_before=original["params"], params_after=pruned.num_params(),
                  heads_kept={k: [len(h) for h in v] for k, v in keep.items()}, kept_heads_index=keep,
                  pruned_validation=translate_split(pruned, data, "validation", rt),
                  pruned_test=translate_split(pruned, data, "test", rt))
    if report["method"] == "l0" and opts["speed_repeats"] > 0:
        unpruned = model_from_checkpoint(source)[0].to(rt.device)
        report["speed"] = speed_of({"original": unpruned, "pruned": pruned}, data, rt, opts["speed_repeats"])
    path = os.path.join(run_dir, "pruned.pt")
    src_tok, tgt_tok = data.src_tok, data.tgt_tok
    pruned_from = {"ckpt": opts["ckpt"], "method": report["method"], "heads": report["heads"]}
    save_checkpoint(path, checkpoint_of(pruned.cpu(), src_tok, tgt_tok, source["train_config"], step=0,
                                        best_bleu=-1.0, pruned_from=pruned_from))
    pruned.to(rt.device)
    report["checkpoint"], report["settings"] = path, settings
    with open(os.path.join(run_dir, "test_translations.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(report["pruned_test"]["hyps"]) + "\n")
    with open(os.path.join(run_dir, "prune_report.json"), "w") as f:
        json.dump(without_hyps(report), f, indent=1)
    print_report(report, keep, pruned.cfg.n_head)
    return report


# what makes two runs the same run: a finished one is reused rather than repeated
RUN_KNOBS = ("ckpt", "dataset", "gate_attn", "learning_rate", "gate_lr", "warmup_frac", "max_iters", "max_minutes",
             "target_ramp", "importance_batches", "distill", "seed", "device", "dtype")


def run_settings(opts: dict, original: dict, method: str, **which) -> dict:
    """The settings of one run: its method, lambda / head count / seed, the knobs of RUN_KNOBS (and
    l0_finetune for an l0 run, target_steer for one with a head count), and the original model's
    BLEU scores (a checkpoint retrained under the same path is another model)."""
    return {"method": method, **which, **{k: opts[k] for k in RUN_KNOBS},
            **({"l0_finetune": opts["l0_finetune"]} if method in ("l0", "unpruned") else {}),
            **({"target_steer": opts["target_steer"]} if method == "l0" and "heads" in which else {}),
            "original_bleu": [original["validation"]["bleu"], original["test"]["bleu"]]}


def finished_run(run_dir: str, settings: dict) -> dict | None:
    """The report of a run that already finished in run_dir with these settings, else None: a
    comparison that stopped part-way (a crash, Ctrl-C, more seeds asked later) goes on from where
    it stopped instead of repeating runs of several minutes each."""
    try:
        with open(os.path.join(run_dir, "prune_report.json")) as f:
            report = json.load(f)
        if report.get("settings") != settings:
            return None
        with open(os.path.join(run_dir, "test_translations.txt"), encoding="utf-8") as f:
            report["pruned_test"]["hyps"] = f.read().split("\n")[:-1]
    except (OSError, ValueError, KeyError):
        return None
    print(f"\n== {describe(report)}: finished before with the same settings, reused from {run_dir}")
    return report


def without_hyps(tree):
    """A report without its translations (they go to test_translations.txt), for the JSON files."""
    if isinstance(tree, dict):
        return {k: without_hyps(v) for k, v in tree.items() if k != "hyps"}
    return [without_hyps(v) for v in tree] if isinstance(tree, list) else tree


@torch.no_grad()
def speed_of(models: dict, data, rt: Runtime, repeats: int) -> dict:
    """Test-split sentences/s of each model, greedy decoding and the encoder alone, measured in
    turns (model A, model B, A, B, ...) so that load changes of a shared machine hit all models
    alike; medians over the repeats. Encoder heads are a small share of decoding work (the
    decoder runs once per output token), so the encoder-only figure shows their cost directly."""
    sp = data.splits["test"]
    encoded = [data.src_tok.encode(t) for t in sp.src_text]
    batches = [src.to(rt.device)
               for _, src in length_sorted_batches(encoded, data.src_tok.pad_id, data.src_tok.eos_id, 64)]
    times = {name: {"decode": [], "encode": []} for name in models}
    for _ in range(max(1, repeats)):
        for name, model in models.items():
            model.eval()
            t0 = time.perf_counter()
            translate(model, data.src_tok, data.tgt_tok, sp.src_text, device=rt.device, amp=rt.amp)
            t1 = time.perf_counter()
            with rt.amp:
                for src in batches:
                    model.encode(src)
            t2 = time.perf_counter()
            times[name]["decode"].append(t1 - t0)
            times[name]["encode"].append(t2 - t1)
    return {name: {f"{kind}_sent_per_s": len(sp) / float(np.median(ts)) for kind, ts in t.items()}
            for name, t in times.items()}


def heads_table(keep: dict, n_head: int) -> str:
    """Heads kept per attention type (rows) and layer (columns), e.g. 'enc  6/8  2/8  1/8  9/24'."""
    n_cols = max(len(layers) for layers in keep.values())
    lines = [f"{'type':<6}" + "".join(f"{f'layer {i}':>9}" for i in range(n_cols)) + f"{'kept':>9}"]
    for kind, layers in keep.items():
        cells = [f"{len(k)}/{n_head}" for k in layers] + [""] * (n_cols - len(layers))
        total = f"{sum(len(k) for k in layers)}/{n_head * len(layers)}"
        lines.append(f"{kind:<6}" + "".join(f"{c:>9}" for c in cells) + f"{total:>9}")
    return "\n".join(lines)


def describe(r: dict) -> str:
    if r["method"] == "l0":
        return f"l0, lambda {r['lambda']:g}" if "lambda" in r else f"l0, {r['heads']} heads asked"
    return r["method"] if "seed" not in r else f"random, seed {r['seed']}"


def print_report(r: dict, keep: dict, n_head: int) -> None:
    finetuned = f" + {r['finetune_steps']} fine-tuning after removal" if "finetune_steps" in r else ""
    print(f"\n== pruning report ({describe(r)}, {r['steps']} steps{finetuned})")
    print(heads_table(keep, n_head))
    print(f"parameters: {r['params_before']:,} -> {r['params_after']:,}")
    print(f"{'model':<10}{'val BLEU':>10}{'test BLEU':>11}{'test chrF':>11}{'decode sent/s':>15}{'encode sent/s':>15}")
    for name in ("original", "gated", "pruned"):
        if f"{name}_test" in r:
            v, t, sp = r[f"{name}_validation"], r[f"{name}_test"], r.get("speed", {}).get(name)
            speed = f"{sp['decode_sent_per_s']:>15.1f}{sp['encode_sent_per_s']:>15.1f}" if sp else ""
            label = "trained on" if name == "pruned" and r["method"] == "unpruned" else name
            print(f"{label:<10}{v['bleu']:>10.2f}{t['bleu']:>11.2f}{t['chrf']:>11.2f}{speed}")
    if "speed" in r:
        o, p = r["speed"]["original"], r["speed"]["pruned"]
        print(f"pruned vs original (interleaved): decoding {p['decode_sent_per_s'] / o['decode_sent_per_s']:.2f}x, "
              f"encoder {p['encode_sent_per_s'] / o['encode_sent_per_s']:.2f}x")
    print(f"saved {r['checkpoint']}" + (f"; plots: {', '.join(r['plots'])}" if "plots" in r else ""))


def compare(reports: list[dict], original: dict, data) -> list[dict]:
    """Each run's test BLEU against the original, against the l0 run that kept as many heads and
    against the unpruned control (if run), with paired-bootstrap p-values
    (decoding.paired_bootstrap); printed as a table."""
    refs = data.splits["test"].tgt_text
    l0_at = {r["heads"]: r for r in reports if r["method"] == "l0"}
    control = next((r for r in reports if r["method"] == "unpruned"), None)
    columns = ("vs_original", "vs_l0") + (("vs_unpruned",) if control else ())
    rows = []
    print("\n== the runs compared on the test split (greedy, cased sacreBLEU; p: paired bootstrap, 1000 resamples)")
    print(f"{'heads':>6}  {'run':<22}{'val BLEU':>9}{'test BLEU':>10}{'vs original (p)':>19}{'vs l0 (p)':>18}"
          + (f"{'vs unpruned (p)':>19}" if control else ""))
    for r in sorted(reports, key=lambda r: (-r["heads"], r["method"] != "l0")):
        hyps = r["pruned_test"]["hyps"]
        row = {"run": describe(r), "heads": r["heads"], "val_bleu": r["pruned_validation"]["bleu"],
               "test_bleu": r["pruned_test"]["bleu"],
               "vs_original": paired_bootstrap(original["test"]["hyps"], hyps, refs)}
        if r["heads"] in l0_at and l0_at[r["heads"]] is not r:
            row["vs_l0"] = paired_bootstrap(l0_at[r["heads"]]["pruned_test"]["hyps"], hyps, refs)
        if control is not None and control is not r:
            row["vs_unpruned"] = paired_bootstrap(control["pruned_test"]["hyps"], hyps, refs)
        cells = [f"{row[k]['difference']:+.2f} ({row[k]['p_value']:.3f})" if k in row else "" for k in columns]
        print(f"{r['heads']:>6}  {row['run']:<22}{row['val_bleu']:>9.2f}{row['test_bleu']:>10.2f}"
              + "".join(f"{c:>{width}}" for c, width in zip(cells, (19, 18, 19))))
        rows.append(row)
    return rows


def main() -> None:
    given = configure(globals(), doc_files=(__file__,))
    opts = {k: v for k, v in globals().items() if k in KNOBS}
    opts["gate_types"] = [t.strip() for t in gate_attn.split(",") if t.strip()]
    methods = [m.strip() for m in method.split(",") if m.strip()]
    if not methods or any(m not in ("l0", "importance", "random", "unpruned") for m in methods):
        raise ConfigError(f"--method={method}: use l0, importance, random and/or unpruned, comma-separated")
    if target_steer not in STEERS:
        raise ConfigError(f"--target_steer={target_steer}: use {' or '.join(STEERS)}")
    targets = parse_numbers(heads, "heads", int) if heads else []
    if targets and "l0_lambda" in given:
        raise ConfigError("--heads=K and --lambda both set the number of heads: give one of them")
    lambdas = [] if targets else parse_numbers(l0_lambda, "lambda", float, 0, 100)
    seed_list = parse_numbers(seeds, "seeds", int)
    if not targets and "l0" not in methods and {"importance", "random"} & set(methods):
        raise ConfigError("--method=importance/random needs --heads=K (or --method=l0,... to take the l0 runs' counts)")
    source = load_checkpoint(ckpt)
    if source["kind"] != "transformer":
        raise ConfigError(f"'{ckpt}' holds a {source['kind']} model: head pruning needs a Transformer checkpoint")
    rt = setup(device, dtype)
    data = data_of_checkpoint(source, dataset)
    base = out_dir or os.path.join(os.path.dirname(ckpt) or ".", f"prune_{'_'.join(opts['gate_types'])}")
    model, _, _ = model_from_checkpoint(source)
    model.to(rt.device).eval()
    if distill:                                     # before the importance score: it too sees the training data
        data = distilled(data, model, ckpt, base, rt)
    n_heads = head_analysis.head_counts(model)
    for kind in opts["gate_types"]:
        if kind not in n_heads:
            raise ConfigError(f"gate_attn='{kind}' is not known: use enc, dec, cross (comma-separated)")
    total = sum(sum(n_heads[kind]) for kind in opts["gate_types"])
    if any(k > total for k in targets):
        raise ConfigError(f"--heads={heads}: the {'+'.join(opts['gate_types'])} attention has {total} heads")
    original = {"params": model.num_params(), "validation": translate_split(model, data, "validation", rt),
                "test": translate_split(model, data, "test", rt)}
    summary, importance = {"original": without_hyps(original)}, None
    if roles:
        summary["roles"] = head_analysis.head_roles(model, data, "validation", source["train_config"]["batch_tokens"])
    if "importance" in methods or roles:
        batches = head_analysis.split_batches(data.splits["train"], data.src_tok, data.tgt_tok,
                                              source["train_config"]["batch_tokens"], shuffle=True, seed=seed,
                                              max_batches=importance_batches)
        importance = head_analysis.head_importance(model, batches, data.tgt_tok.pad_id,
                                                   source["train_config"]["label_smoothing"], opts["gate_types"])
        summary["importance"] = {k: [v.tolist() for v in layers] for k, layers in importance.items()}
    del model

    # the l0 runs first (a lambda or a target each); then the baselines, at each target or at each
    # head count an l0 run kept; a single run writes into `base` itself, several into subfolders
    runs_l0 = ([(lam, None) for lam in lambdas] + [(0.0, k) for k in targets]) if "l0" in methods else []
    baselines_per_count = ("importance" in methods) + len(seed_list) * ("random" in methods)
    single = len(runs_l0) + len(targets or runs_l0) * baselines_per_count + ("unpruned" in methods) == 1
    reports = []

    def run_once(folder: str, settings: dict, train) -> None:
        """Reuse the report of a run finished with these settings, or call train(run_dir) now (it
        returns pruned model, keep-set, report) and score and save its result; called at once."""
        run_dir = base if single else os.path.join(base, folder)
        os.makedirs(run_dir, exist_ok=True)
        report = finished_run(run_dir, settings)
        if report is None:
            report = finish(*train(run_dir), original, source, data, opts, run_dir, rt, settings)
        reports.append(report)

    for lam, k in runs_l0:
        run_once(f"lambda_{lam:g}" if k is None else f"l0_{k}_heads",
                 run_settings(opts, original, "l0", **({"lambda": lam} if k is None else {"heads": k})),
                 lambda run_dir: run_l0(source, data, opts, run_dir, rt, lam, k))
    for k in targets or sorted({r["heads"] for r in reports}, reverse=True):
        chosen = []
        if "importance" in methods:
            chosen.append(("importance", None, head_analysis.top_k_heads(n_heads, importance, k)))
        if "random" in methods:
            chosen += [("random", s, head_analysis.random_heads(n_heads, opts["gate_types"], k, s)) for s in seed_list]
        for name, s, keep in chosen:
            run_once(f"{name}_{k}_heads" + (f"_seed_{s}" if s is not None else ""),
                     run_settings(opts, original, name, heads=k, **({"seed": s} if s is not None else {})),
                     lambda run_dir: run_baseline(keep, name, s, source, data, opts, run_dir, rt))
    if "unpruned" in methods:
        run_once("unpruned", run_settings(opts, original, "unpruned"),
                 lambda run_dir: run_unpruned(source, data, opts, run_dir, rt))
    os.makedirs(base, exist_ok=True)
    if len(reports) > 1:
        summary["comparison"] = compare(reports, original, data)
        print(f"trade-off plot: {head_analysis.plot_tradeoff(base, reports, original['test']['bleu'])}")
    if roles:
        summary["kept_vs_removed"] = {}
        for k in sorted({r["heads"] for r in reports if r["method"] != "unpruned"}, reverse=True):
            kept = {describe(r): r["kept_heads_index"] for r in reports if r["heads"] == k}
            path = head_analysis.plot_heads(os.path.join(base, f"heads_{k}.png"), summary["roles"],
                                            importance, kept)
            print(f"what the heads do, and which {k} each method kept: {path}")
            for name, keep in kept.items():
                summary["kept_vs_removed"][f"{name} ({k} heads)"] = head_analysis.kept_vs_removed(
                    summary["roles"], keep, opts["gate_types"])
    summary["runs"] = [without_hyps(r) for r in reports]
    with open(os.path.join(base, "prune_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main_guard(main, DataError)
