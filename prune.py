"""
Prune a Transformer's attention heads with L0 gates (Voita et al. 2019), the hard-concrete gates
of Louizos et al. 2018 (gates.py):

    python prune.py --lambda=0.05                                       # transformer_en_it's model
    python prune.py --ckpt=out/multi30k/best.pt --heads=6               # keep exactly 6 encoder heads
    python prune.py --ckpt=out/multi30k/best.pt --gate_attn=enc,dec,cross --heads=21

A gate on every head of the chosen attention types, trained with the model by train.py's loop on
cross-entropy + lambda * L0 (the expected open heads of a layer, averaged over the gated layers;
--heads=K steers the count to K instead); the closed heads removed physically; the pruned model
fine-tuned for as many steps again; the heads kept, BLEU before and after, plots of the gates.
pruned.pt is a normal checkpoint. Against other choices of heads: tools/prune_study.py.
Leaves out: pruning feed-forward units or layers, iterative pruning.
"""

import json
import os
import time
from dataclasses import asdict

import torch

from checkpoint import (checkpoint_of, claim_run_dir, load_checkpoint, model_from_checkpoint,
                        model_of, save_checkpoint)
from configurator import ConfigError, configure, knob_names, main_guard
from data import DataError, data_of_checkpoint
from decoding import score, translate
from gates import STEERS, L0Penalty, attach_gates, eval_gates
from model_transformer import Transformer
from runtime import Runtime, setup
from train import make_optimizer, run_progress, train_loop

# -----------------------------------------------------------------------------
ckpt = "out/transformer_en_it/best.pt"  # the trained Transformer checkpoint to prune
out_dir = ""  # run folder ('' = <checkpoint folder>/prune_<gate_attn>)
overwrite = False  # may replace the run out_dir holds (otherwise it is refused)
l0_lambda = 0.05  # penalty weight (--lambda=...): the larger, the fewer heads survive
heads = 0  # > 0: keep exactly this many heads of the gated types, instead of a lambda
gate_attn = "enc"  # attention types to gate, comma-separated: enc (encoder self), dec (decoder self), cross
target_steer = "lagrangian"  # --heads: how the count is steered to K: 'lagrangian' or 'quadratic' (gates.L0Penalty)
target_ramp = 0.5  # --heads: share of the gating over which the count aimed at falls from all heads to K
dataset = ""  # a local folder to read instead of the checkpoint's dataset (no network)
learning_rate = 2e-4  # peak learning rate of the model weights, while gating and while fine-tuning
gate_lr = 0.05  # learning rate of the gate logits (they must travel far: ~5 units in log-odds)
warmup_frac = 0.05  # share of each run spent warming up
max_iters = 0  # optimizer steps of the gating, and again of the fine-tuning (0 = use max_minutes)
max_minutes = 8.0  # wall-clock budget of the gating, and again of the fine-tuning
log_interval = 50  # steps between log lines
eval_interval = 200  # steps between validation BLEU evaluations
eval_sentences = 500  # validation sentences translated while training (0 = all)
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'bfloat16', 'float16', 'float32'
seed = 1337  # seeds the gate noise, dropout and batch order
# -----------------------------------------------------------------------------
KNOBS = knob_names(globals())
KINDS = ("enc", "dec", "cross")   # Transformer.attention_modules(); ties between equal gates go in this order


def prune_heads(model, gate_values: dict) -> tuple[Transformer, dict]:
    """A new Transformer without the closed heads, computing exactly what the gated model computes.

    For each gated attention module with gate values z (H,): keep the heads with z > 0, slice their
    rows of q/k/v_proj and their columns of out_proj, and fold z into those columns
    (out_proj(z_h * head_h) = (out_proj columns * z_h) head_h). No head left: out_proj is empty and
    the module computes its bias alone, as the gated module does with all gates at 0. Returns the
    model and its keep-set {type: [[kept head indices] per layer]}."""
    modules = model.attention_modules()
    keep = {kind: [[h for h in range(m.n_head) if kind not in gate_values or gate_values[kind][i][h] > 0]
                   for i, m in enumerate(modules[kind])] for kind in modules}
    cfg = {**asdict(model.cfg), "enc_self_heads": [len(k) for k in keep["enc"]],
           "dec_self_heads": [len(k) for k in keep["dec"]], "dec_cross_heads": [len(k) for k in keep["cross"]]}
    pruned = model_of("transformer", cfg)
    state = {k: v for k, v in model.state_dict().items() if "head_gate" not in k}
    prefix = {id(m): name for name, m in model.named_modules()}
    for kind in modules:
        for i, old in enumerate(modules[kind]):
            Dh, kept = old.head_dim, keep[kind][i]
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


def run_limits(opts: dict) -> dict:
    """One run's stop conditions for train_loop: max_iters steps if set, else max_minutes."""
    return {"max_iters": opts["max_iters"], "max_epochs": 0.0,
            "max_minutes": 0.0 if opts["max_iters"] else opts["max_minutes"]}


def train_budget(model, source: dict, data, opts: dict, run_dir: str, rt: Runtime, penalty=None) -> int:
    """Train a model with train.py's loop for one run's budget in run_dir: the gated model with the
    L0 penalty, or the pruned one without (the original run's data, batches, dropout and
    smoothing; pruning's seed, learning rate and limits; no early stopping, no averaging).
    Returns the steps taken."""
    cfg = {**source["train_config"], "init_from": opts["ckpt"], "out_dir": run_dir, "overfit_batches": 0,
           "seed": opts["seed"], "patience": 0, "average_last": 0, **run_limits(opts),
           **{k: opts[k] for k in ("learning_rate", "warmup_frac", "log_interval", "eval_interval", "eval_sentences",
                                   "device", "dtype")}}
    os.makedirs(run_dir, exist_ok=True)
    optimizer = make_optimizer(model, cfg, penalty.lr_scale if penalty is not None else None)
    return train_loop(model, optimizer, data, cfg, rt, penalty=penalty).step


def kept_gates(gates: dict, k: int) -> dict:
    """The gate values with only the k most open gates (largest log_alpha) kept; should one of them
    have closed, it is kept at full weight."""
    ranked = sorted((-float(a), KINDS.index(kind), i, h) for kind, layers in gates.items()
                    for i, g in enumerate(layers) for h, a in enumerate(g.log_alpha.detach().cpu()))
    chosen = {(KINDS[j], i, h) for _, j, i, h in ranked[:k]}
    return {kind: [torch.tensor([(z[h].item() if z[h] > 0 else 1.0) if (kind, i, h) in chosen else 0.0
                                 for h in range(len(z))]) for i, z in enumerate(layers)]
            for kind, layers in eval_gates(gates).items()}


def gate_and_remove(source: dict, data, opts: dict, run_dir: str, rt: Runtime, lam: float, target: int | None) -> tuple:
    """Gate, train with the penalty, remove the closed heads: (pruned model, keep-set, report). With
    a lambda the heads whose deterministic gate is above 0 are kept, with a target the K most open."""
    model = model_from_checkpoint(source)[0]
    gates = attach_gates(model, opts["gate_types"])
    model.to(rt.device)                                  # with its new gates
    limits, start = run_limits(opts), time.perf_counter()
    elapsed_share = lambda: (time.perf_counter() - start) / 60 / max(limits["max_minutes"], 1e-9)  # noqa: E731
    progress = lambda: run_progress(penalty.steps, 0.0, elapsed_share(), limits)  # noqa: E731
    penalty = L0Penalty(gates, lam, opts["gate_lr"] / opts["learning_rate"], target, progress, opts["target_ramp"],
                        opts["target_steer"])
    what = f"lambda {lam:g}" if target is None else f"a target of {target} heads"
    print(f"\n== l0, {what}: gating {', '.join(opts['gate_types'])} heads ({model.num_params() / 1e6:.2f}M parameters)")
    penalty.log(0)
    steps = train_budget(model, source, data, opts, run_dir, rt, penalty)
    penalty.log(steps)
    report = {"method": "l0", "steps": steps, "gated_validation": translate_split(model, data, "validation", rt),
              "gated_test": translate_split(model, data, "test", rt), **({"lambda": lam} if target is None else {})}
    z = eval_gates(gates) if target is None else kept_gates(gates, target)
    report["gate_values"] = {k: [zi.tolist() for zi in v] for k, v in z.items()}
    pruned, keep = prune_heads(model.cpu(), {k: [zi.cpu() for zi in v] for k, v in z.items()})
    report["plots"] = plot_gates(run_dir, penalty.history, opts["gate_types"], model.cfg.n_head)
    return pruned, keep, report


def finetune_pruned(pruned, keep: dict, report: dict, source: dict, data, opts: dict, run_dir: str, rt: Runtime) -> None:
    """Fine-tune the pruned model for as long as the gating took, in run_dir/finetune."""
    print(f"\n== l0: {heads_kept(keep, opts['gate_types'])} heads kept, then fine-tuned for as long")
    report["finetune_steps"] = train_budget(pruned.to(rt.device), source, data, opts, os.path.join(run_dir, "finetune"), rt)


@torch.no_grad()
def translate_split(model, data, split: str, rt: Runtime) -> dict:
    """Greedy translations of a whole split and their scores: bleu, bleu_lc, chrf, hyps."""
    sp = data.splits[split]
    hyps = translate(model, data.src_tok, data.tgt_tok, sp.src_text, device=rt.device, amp=rt.amp)
    s = score(hyps, sp.tgt_text)
    return {"bleu": s["bleu"], "bleu_lc": s["bleu_lc"], "chrf": s["chrf"], "hyps": hyps}


def heads_kept(keep: dict, kinds: list[str]) -> int:
    return sum(len(k) for kind in kinds for k in keep[kind])


def finish(pruned, keep: dict, report: dict, original: dict, source: dict, data, opts: dict, run_dir: str,
           rt: Runtime, name=None, last_row: str = "pruned") -> dict:
    """Score the pruned model, save it as pruned.pt, then its report (prune_report.json, written last:
    its presence marks a finished run) and test translations; print the report, titled
    name(report) (describe unless given), the pruned model's row labelled last_row."""
    pruned.to(rt.device).eval()
    report.update(heads=heads_kept(keep, opts["gate_types"]), gate_attn=opts["gate_types"],
                  original_validation=original["validation"], original_test=original["test"],
                  params_before=original["params"], params_after=pruned.num_params(),
                  heads_kept={k: [len(h) for h in v] for k, v in keep.items()}, kept_heads_index=keep,
                  pruned_validation=translate_split(pruned, data, "validation", rt),
                  pruned_test=translate_split(pruned, data, "test", rt), checkpoint=os.path.join(run_dir, "pruned.pt"))
    pruned_from = {"ckpt": opts["ckpt"], "method": report["method"], "heads": report["heads"]}
    save_checkpoint(report["checkpoint"], checkpoint_of(pruned.cpu(), data.src_tok, data.tgt_tok, source["train_config"],
                                                        step=0, best_bleu=-1.0, pruned_from=pruned_from))
    pruned.to(rt.device)
    with open(os.path.join(run_dir, "test_translations.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(report["pruned_test"]["hyps"]) + "\n")
    with open(os.path.join(run_dir, "prune_report.json"), "w") as f:
        json.dump(without_hyps(report), f, indent=1)
    print_report(report, keep, pruned.cfg.n_head, (name or describe)(report), last_row)
    return report


def without_hyps(tree):
    """A report without its translations (they go to test_translations.txt), for the JSON files."""
    if isinstance(tree, dict):
        return {k: without_hyps(v) for k, v in tree.items() if k != "hyps"}
    return [without_hyps(v) for v in tree] if isinstance(tree, list) else tree


def describe(r: dict) -> str:
    return f"l0, lambda {r['lambda']:g}" if "lambda" in r else f"l0, {r['heads']} heads asked"


def print_report(r: dict, keep: dict, n_head: int, title: str, last_row: str = "pruned") -> None:
    """The heads kept per type and layer, the parameters, and BLEU/chrF of the original, gated and
    pruned models (last_row: the pruned model's label)."""
    finetuned = f" + {r['finetune_steps']} fine-tuning after removal" if "finetune_steps" in r else ""
    print(f"\n== pruning report ({title}, {r['steps']} steps{finetuned})")
    n_cols = max(len(layers) for layers in keep.values())       # heads kept per type (rows) and layer
    print(f"{'type':<6}" + "".join(f"{f'layer {i}':>9}" for i in range(n_cols)) + f"{'kept':>9}")
    for kind, layers in keep.items():
        cells = [f"{len(k)}/{n_head}" for k in layers] + [""] * (n_cols - len(layers))
        total = f"{sum(len(k) for k in layers)}/{n_head * len(layers)}"
        print(f"{kind:<6}" + "".join(f"{c:>9}" for c in cells) + f"{total:>9}")
    print(f"parameters: {r['params_before']:,} -> {r['params_after']:,}")
    print(f"{'model':<10}{'val BLEU':>10}{'test BLEU':>11}{'test chrF':>11}")
    for name in ("original", "gated", "pruned"):
        if f"{name}_test" in r:
            v, t = r[f"{name}_validation"], r[f"{name}_test"]
            label = last_row if name == "pruned" else name
            print(f"{label:<10}{v['bleu']:>10.2f}{t['bleu']:>11.2f}{t['chrf']:>11.2f}")
    print(f"saved {r['checkpoint']}" + (f"; plots: {', '.join(r['plots'])}" if "plots" in r else ""))


def plot_gates(out_dir: str, history: list, gate_types: list[str], n_head: int) -> list[str]:
    """The gates over a run (history: L0Penalty's log records): P(gate open) per layer x head at
    the end (gates_final.png) and over the run (gates.gif), the heads open against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    labels = [f"{kind} {i}" for kind in gate_types for i in range(len(history[0]["p_open"][kind]))]
    paths = [os.path.join(out_dir, name) for name in ("gates_final.png", "gates.gif", "heads_vs_step.png")]

    def draw(ax, rec):                  # rows: the layers of every gated type; columns: heads
        ax.clear()
        im = ax.imshow([row for kind in gate_types for row in rec["p_open"][kind]], vmin=0, vmax=1, cmap="viridis",
                       aspect="auto")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(n_head))
        ax.set_xlabel("head")
        ax.set_title(f"P(gate open), step {rec['step']}")
        return im

    fig, ax = plt.subplots(figsize=(1 + 0.6 * n_head, 1 + 0.45 * len(labels)))
    fig.colorbar(draw(ax, history[-1]), ax=ax)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=90)
    FuncAnimation(fig, lambda i: draw(ax, history[i]), frames=len(history)).save(paths[1], writer=PillowWriter(fps=4))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in gate_types:
        ax.plot([r["step"] for r in history], [r["heads_open"][kind] for r in history], label=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("heads open (eval gate > 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=90)
    plt.close(fig)
    return paths


def setup_run(opts: dict) -> tuple:
    """Check the knobs and name the run folder (opts["run_dir"]); load the checkpoint, its data and
    model: (source, data, model, rt)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # the gates would have to be trained in step on every process and the pruned model written
        # once; runs take minutes on one GPU, so pruning stays a one-process script
        raise ConfigError(f"prune.py runs in one process, and torchrun started {os.environ['WORLD_SIZE']}: run it "
                          "with python (on one GPU: CUDA_VISIBLE_DEVICES=0 python prune.py ...)")
    opts["gate_types"] = [t.strip() for t in opts["gate_attn"].split(",") if t.strip()]
    opts["run_dir"] = opts["out_dir"] or os.path.join(os.path.dirname(opts["ckpt"]) or ".",
                                                      f"prune_{'_'.join(opts['gate_types'])}")
    if not opts["gate_types"] or any(kind not in KINDS for kind in opts["gate_types"]):
        raise ConfigError(f"gate_attn='{opts['gate_attn']}' is not known: use enc, dec, cross (comma-separated)")
    if opts["target_steer"] not in STEERS:
        raise ConfigError(f"--target_steer={opts['target_steer']}: use {' or '.join(STEERS)}")
    source = load_checkpoint(opts["ckpt"])
    if source["kind"] != "transformer":
        raise ConfigError(f"'{opts['ckpt']}' holds a {source['kind']} model: head pruning needs a Transformer checkpoint")
    rt = setup(opts["device"], opts["dtype"])
    data = data_of_checkpoint(source, opts["dataset"])
    model = model_from_checkpoint(source)[0].to(rt.device).eval()
    return source, data, model, rt


def main() -> None:
    given = configure(globals(), doc_files=(__file__,))
    opts = {k: globals()[k] for k in KNOBS}
    if heads and "l0_lambda" in given:
        raise ConfigError("--heads=K and --lambda both set the number of heads: give one of them")
    if heads < 0 or not 0 <= l0_lambda < 100:
        raise ConfigError(f"--heads={heads}, --lambda={l0_lambda:g}: give heads > 0 or a lambda in [0, 100)")
    source, data, model, rt = setup_run(opts)
    total = sum(m.n_head for kind in opts["gate_types"] for m in model.attention_modules()[kind])
    if heads > total:
        raise ConfigError(f"--heads={heads}: the {'+'.join(opts['gate_types'])} attention has {total} heads")
    run_dir = opts["run_dir"]
    claim_run_dir(run_dir, True, overwrite, start=ckpt)
    original = {"params": model.num_params(), "validation": translate_split(model, data, "validation", rt),
                "test": translate_split(model, data, "test", rt)}
    pruned, keep, report = gate_and_remove(source, data, opts, run_dir, rt, l0_lambda, heads or None)
    finetune_pruned(pruned, keep, report, source, data, opts, run_dir, rt)
    finish(pruned, keep, report, original, source, data, opts, run_dir, rt)


if __name__ == "__main__":
    main_guard(main, DataError)
