"""
Is L0's choice of heads better than the simple alternatives? prune.py's runs, several at once,
against baselines at the same head count and fine-tuning budget, compared with paired-bootstrap
p-values (the study in docs/pruning.md):

    python tools/prune_study.py --ckpt=out/multi30k/best.pt --lambda=0.05,0.07,0.1 --l0_finetune=False  # a sweep
    python tools/prune_study.py --ckpt=out/multi30k/best.pt --heads=10,6,3 --method=l0,importance,random --seeds=1,2
    python tools/prune_study.py --ckpt=out/multi30k/best.pt --gate_attn=enc,dec,cross --heads=21 --distill=True \
        --method=l0,unpruned

Methods: l0 (prune.py's run, one per lambda or head count), importance (the K heads of highest
head importance, Michel et al. 2019, tools/heads.py), random (K heads drawn at random, one run
per seed), unpruned (the control: the original model with every head, trained on as long as an
l0 run, which tells what pruning costs from what the extra training does). The baselines remove
all other heads from the original model and fine-tune it for the budget an l0 run fine-tunes.
--distill: every method trains on the original model's beam-5 translations of the training
sources (sequence-level knowledge distillation, Kim & Rush 2016). Reported: heads kept, BLEU,
decoding speed (l0), what each head of the original model does (heads_K.png), BLEU against heads
kept (tradeoff.png), p-values between the runs. A finished run is reused when its settings match.
"""

import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
import prune  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402
from checkpoint import claim_run_dir, model_from_checkpoint  # noqa: E402
from data import DataError, Split  # noqa: E402
from decoding import length_sorted_batches, translate  # noqa: E402
from tools import heads as head_analysis  # noqa: E402
from tools.compare import paired_bootstrap  # noqa: E402

# -----------------------------------------------------------------------------
# every prune.py knob is a knob here too (python tools/prune_study.py -h lists them); these are the study's
globals().update({k: getattr(prune, k) for k in prune.KNOBS})
l0_lambda = "0.05"  # l0: penalty weight, --lambda=...; a comma-separated list runs a sweep
heads = ""  # keep exactly K heads of the gated types (comma-separated Ks); '' = as many as the l0 runs keep
method = "l0"  # 'l0', 'importance', 'random', 'unpruned' (the control); comma-separated
l0_finetune = True  # l0: fine-tune after removal for the baselines' budget (False: gated training only, as Voita)
distill = False  # train every method on the original model's beam-5 translations of the training sources
seeds = "1,2,3"  # random: one run per seed
importance_batches = 100  # importance: training batches the score is summed over
roles = True  # measure what each head of the original model does (validation split) and draw heads_K.png
speed_repeats = 3  # l0: decoding speed, original and pruned in turns, median of this many (0 = not measured)
# -----------------------------------------------------------------------------
KNOBS = [*prune.KNOBS, "method", "l0_finetune", "distill", "seeds", "importance_batches", "roles", "speed_repeats"]


def parse_numbers(text: str, knob: str, kind=float, low: float = 0, high: float = float("inf")) -> list:
    """'0.05,0.1' -> [0.05, 0.1]: a comma-separated knob, each value of `kind` in [low, high)."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{knob}={text}: give {kind.__name__} values, comma-separated, like 1,2") from None
    if not values or any(not low <= v < high for v in values):
        raise ConfigError(f"--{knob}={text}: give at least one value, each >= {low:g} and < {high:g}")
    return values


def distilled(data, model, ckpt_path: str, base: str, rt, overwrite: bool = False):
    """data with the training targets replaced by the original model's (`model`, loaded from
    ckpt_path) beam-5 translations of the training sources: a pruned model learns to say what the
    original said, an easier target for a smaller model than the varied human references, and one
    the original already meets. Translated once (4.5 minutes for Multi30k on a 2-core CPU) into
    base/distilled_train.jsonl and reused (another checkpoint's file is replaced only with overwrite);
    pairs whose translation came out empty are left out."""
    sp, path = data.splits["train"], os.path.join(base, "distilled_train.jsonl")
    stamp = {"ckpt": os.path.abspath(ckpt_path), "sentences": len(sp)}
    try:
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        hyps = lines[1:] if lines and lines[0] == stamp else None
    except (OSError, ValueError):
        hyps = None
    if hyps is None or len(hyps) != len(sp):
        if os.path.exists(path) and not overwrite:
            raise ConfigError(f"{path} holds translations of another checkpoint or data: choose another --out_dir, "
                              "or replace them with --overwrite=True")
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


def run_baseline(keep: dict, method: str, seed: int | None, source: dict, data, opts: dict, run_dir: str,
                 rt) -> tuple:
    """Remove all heads but those of `keep` from the original model, then fine-tune it for the
    same budget as an l0 run: (pruned model, keep-set, report). seed: the random draw's, or None."""
    model, _, _ = model_from_checkpoint(source)
    pruned, keep = prune.prune_heads(model, head_analysis.gate_values(head_analysis.head_counts(model), keep))
    print(f"\n== {method}: {prune.heads_kept(keep, opts['gate_types'])} {'+'.join(opts['gate_types'])} heads kept, "
          f"then fine-tuned")
    steps = prune.train_budget(pruned.to(rt.device), source, data, opts, run_dir, rt)
    return pruned, keep, {"method": method, "steps": steps, **({"seed": seed} if seed is not None else {})}


def run_l0(source: dict, data, opts: dict, run_dir: str, rt, lam: float, target: int | None) -> tuple:
    """prune.py's run: gate, remove, and with l0_finetune fine-tune the pruned model (pruned, keep-set, report)."""
    pruned, keep, report = prune.gate_and_remove(source, data, opts, run_dir, rt, lam, target)
    if opts["l0_finetune"]:
        prune.finetune_pruned(pruned, keep, report, source, data, opts, run_dir, rt)
    return pruned, keep, report


def describe(r: dict) -> str:
    """A run's name in the tables: prune.describe's for l0, the method (and random draw) for the baselines."""
    if r["method"] == "l0":
        return prune.describe(r)
    return r["method"] + (f", seed {r['seed']}" if "seed" in r else "")


def run_unpruned(source: dict, data, opts: dict, run_dir: str, rt) -> tuple:
    """The control: the original model, every head kept, trained on for as many steps as an l0
    run trains (gating, then with l0_finetune a second run's budget, as the fine-tuning after
    removal): (model, keep-set of all heads, report)."""
    model, _, _ = model_from_checkpoint(source)
    keep = {kind: [list(range(n)) for n in counts] for kind, counts in head_analysis.head_counts(model).items()}
    print(f"\n== unpruned: all {prune.heads_kept(keep, opts['gate_types'])} heads, trained on as long as an l0 run")
    model.to(rt.device)
    steps = prune.train_budget(model, source, data, opts, run_dir, rt)
    if opts["l0_finetune"]:
        steps += prune.train_budget(model, source, data, opts, os.path.join(run_dir, "finetune"), rt)
    return model, keep, {"method": "unpruned", "steps": steps}


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


@torch.no_grad()
def speed_of(models: dict, data, rt, repeats: int) -> dict:
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


def compare(reports: list[dict], original: dict, data) -> list[dict]:
    """Each run's test BLEU against the original, against the l0 run that kept as many heads and
    against the unpruned control (if run), with paired-bootstrap p-values; printed as a table."""
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


def print_speed(r: dict) -> None:
    o, p = r["speed"]["original"], r["speed"]["pruned"]
    print(f"decoding speed, pruned vs original (interleaved): decoding "
          f"{p['decode_sent_per_s'] / o['decode_sent_per_s']:.2f}x ({p['decode_sent_per_s']:.1f} sentences/s), "
          f"encoder {p['encode_sent_per_s'] / o['encode_sent_per_s']:.2f}x")


def main() -> None:
    given = configure(globals(), doc_files=(__file__, prune.__file__))
    opts = {k: globals()[k] for k in KNOBS}
    methods = [m.strip() for m in method.split(",") if m.strip()]
    if not methods or any(m not in ("l0", "importance", "random", "unpruned") for m in methods):
        raise ConfigError(f"--method={method}: use l0, importance, random and/or unpruned, comma-separated")
    targets = parse_numbers(heads, "heads", int) if heads else []
    if targets and "l0_lambda" in given:
        raise ConfigError("--heads=K and --lambda both set the number of heads: give one of them")
    lambdas = [] if targets else parse_numbers(l0_lambda, "lambda", float, 0, 100)
    seed_list = parse_numbers(seeds, "seeds", int)
    if not targets and "l0" not in methods and {"importance", "random"} & set(methods):
        raise ConfigError("--method=importance/random needs --heads=K (or --method=l0,... to take the l0 runs' counts)")
    source, data, model, rt = prune.setup_run(opts)
    base = opts["run_dir"]
    claim_run_dir(base, False)                      # no second study in this folder while this one runs
    if distill:                                     # before the importance score: it too sees the training data
        data = distilled(data, model, ckpt, base, rt, overwrite)
    n_heads = head_analysis.head_counts(model)
    total = sum(sum(n_heads[kind]) for kind in opts["gate_types"])
    if any(k > total for k in targets):
        raise ConfigError(f"--heads={heads}: the {'+'.join(opts['gate_types'])} attention has {total} heads")
    original = {"params": model.num_params(), "validation": prune.translate_split(model, data, "validation", rt),
                "test": prune.translate_split(model, data, "test", rt)}
    summary, importance = {"original": prune.without_hyps(original)}, None
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
        report = finished_run(run_dir, settings)
        if report is None:
            claim_run_dir(run_dir, True, overwrite, "it has other settings or did not finish, so it is not reused: ",
                          start=ckpt)
            pruned, keep, report = train(run_dir)
            if report["method"] == "l0" and speed_repeats > 0:
                unpruned = model_from_checkpoint(source)[0].to(rt.device)
                report["speed"] = speed_of({"original": unpruned, "pruned": pruned.to(rt.device)}, data, rt,
                                           speed_repeats)
            report["settings"] = settings
            report = prune.finish(pruned, keep, report, original, source, data, opts, run_dir, rt, describe,
                                  "trained on" if report["method"] == "unpruned" else "pruned")
            if "speed" in report:
                print_speed(report)
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
    summary["runs"] = [prune.without_hyps(r) for r in reports]
    with open(os.path.join(base, "prune_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main_guard(main, DataError)
