"""
Prune attention heads with L0 gates (Voita et al. 2019, following Louizos et al. 2018):

    python prune.py --lambda=0.05                          # the checkpoint of config/transformer_en_it.py
    python prune.py --ckpt=out/multi30k/best.pt --lambda=0.01,0.05,0.1   # a sweep: trade-off curve

1. attach a hard-concrete gate (gates.py) to every head of the chosen attention types;
2. fine-tune model + gates on  cross-entropy + lambda * L0,  with train.py's own loop;
   L0 = the expected number of open heads, summed over heads and averaged over gated layers
   (Voita et al.'s normalisation), so lambda means "cost of one head in one layer";
3. remove closed heads physically (slice q/k/v rows and out_proj columns; a layer with no head
   left keeps only its output bias) and save a normal checkpoint that sample.py/train.py load;
4. report heads kept, parameters, BLEU (original / gated / pruned) and decoding speed, with plots.
Leaves out: pruning feed-forward units or whole layers.
"""

import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from checkpoint import (attach_gates, build_model, checkpoint_of, data_of_checkpoint, load_checkpoint,
                        model_from_checkpoint, save_checkpoint)
from configurator import ConfigError, configure, main_guard
from data import DataError
from decoding import length_sorted_batches, score, translate
from runtime import Runtime, setup
from train import train_loop

# -----------------------------------------------------------------------------
ckpt = "out/transformer_en_it/best.pt"  # the trained Transformer checkpoint to prune
out_dir = ""  # run folder ('' = <checkpoint folder>/prune_<gate_attn>)
l0_lambda = "0.05"  # penalty weight, --lambda=...; a comma-separated list runs a sweep
gate_attn = "enc"  # attention types to gate, comma-separated: enc, dec, cross
dataset = ""  # a local folder to read instead of the checkpoint's dataset (no network)
learning_rate = 2e-4  # peak learning rate of the model weights while gating
gate_lr = 0.05  # learning rate of the gate logits (they must travel far: ~5 units in log-odds)
warmup_frac = 0.05  # share of the run spent warming up
max_iters = 0  # optimizer steps per lambda (0 = use max_minutes)
max_minutes = 8.0  # wall-clock budget per lambda
log_interval = 50  # steps between log lines
eval_interval = 200  # steps between validation BLEU evaluations
eval_sentences = 500  # validation sentences decoded during gating (0 = all)
speed_repeats = 3  # speed measurements per model, original and pruned in turns (the median is reported)
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'bfloat16', 'float16', 'float32'
seed = 1337  # seeds the gate noise
# -----------------------------------------------------------------------------
KNOBS = [k for k, v in list(globals().items()) if not k.startswith("_") and type(v) in (bool, int, float, str)]


def parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lambda={text}: give a number or a comma-separated list like 0.01,0.05") from None
    if not values or any(not (0 <= v < 100) for v in values):
        raise ConfigError(f"--lambda={text}: each value must be >= 0 and < 100 (Voita et al. use 0.01-0.1)")
    return values


def eval_gates(gates: dict) -> dict:
    """{type: [(H,) deterministic gate values per layer]} in eval mode (a closed head has exactly 0)."""
    out = {}
    for kind, layer_gates in gates.items():
        out[kind] = []
        for g in layer_gates:
            was = g.training
            g.eval()
            with torch.no_grad():
                out[kind].append(g().float())
            g.train(was)
    return out


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
            heads = keep[kind][i]
            rows = torch.tensor([h * Dh + j for h in heads for j in range(Dh)], dtype=torch.long)
            z = gate_values[kind][i] if kind in gate_values else torch.ones(old.n_head)
            scale = z[heads].repeat_interleave(Dh) if heads else torch.ones(0)
            name = prefix[id(old)]
            for proj in ("q_proj", "k_proj", "v_proj"):
                state[f"{name}.{proj}.weight"] = getattr(old, proj).weight.detach()[rows]
                state[f"{name}.{proj}.bias"] = getattr(old, proj).bias.detach()[rows]
            state[f"{name}.out_proj.weight"] = old.out_proj.weight.detach()[:, rows] * scale
    pruned.load_state_dict(state)
    return pruned, keep


@torch.no_grad()
def bleu_of(model, data, split: str, rt: Runtime) -> dict:
    """Greedy BLEU/chrF on a whole split."""
    sp = data.splits[split]
    s = score(translate(model, data.src_tok, data.tgt_tok, sp.src_text, device=rt.device, amp=rt.amp), sp.tgt_text)
    return {"bleu": s["bleu"], "chrf": s["chrf"]}


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


def plot_gates(out_dir: str, history: list, gate_types: list[str], n_head: int) -> list[str]:
    """Heatmap of P(gate open) per layer x head at the end, its evolution (PNG frames + GIF), heads kept vs step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    def grid(p_open):              # rows = layers of every gated type, columns = heads
        return np.array([row for kind in gate_types for row in p_open[kind]])

    labels = [f"{kind} {i}" for kind in gate_types for i in range(len(history[0]["p_open"][kind]))]
    frames_dir = os.path.join(out_dir, "gate_frames")
    os.makedirs(frames_dir, exist_ok=True)
    paths = []

    def draw(ax, rec):
        ax.clear()
        im = ax.imshow(grid(rec["p_open"]), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(n_head))
        ax.set_xlabel("head")
        ax.set_title(f"P(gate open), step {rec['step']}")
        return im

    fig, ax = plt.subplots(figsize=(1 + 0.6 * n_head, 1 + 0.45 * len(labels)))
    fig.colorbar(draw(ax, history[-1]), ax=ax)
    fig.tight_layout()
    for i, rec in enumerate(history):
        draw(ax, rec)
        path = os.path.join(frames_dir, f"gates_{i:04d}.png")
        fig.savefig(path, dpi=80)
    draw(ax, history[-1])
    paths.append(os.path.join(out_dir, "gates_final.png"))
    fig.savefig(paths[-1], dpi=90)
    anim = FuncAnimation(fig, lambda i: draw(ax, history[i]), frames=len(history))
    paths.append(os.path.join(out_dir, "gates.gif"))
    anim.save(paths[-1], writer=PillowWriter(fps=4))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in gate_types:
        ax.plot([r["step"] for r in history], [r["heads_open"][kind] for r in history], label=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("heads open (eval gate > 0)")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "heads_vs_step.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def evaluate_original(source: dict, data, rt: Runtime) -> dict:
    model, _, _ = model_from_checkpoint(source)
    model.to(rt.device).eval()
    return {f"original_{split}": bleu_of(model, data, split, rt) for split in ("validation", "test")}


class L0Penalty:
    """lambda x L0, the term train_loop adds to every step's loss, for gates {type: [gate per layer]}.
    L0 = the expected number of open heads, summed over the heads of a layer and averaged over the
    gated layers (Voita et al.), so lambda is the cost of one head in one layer. It also tells
    the loop what to log (heads open, L0, P(open) per head, kept in `history` for the plots) and
    lets the gate logits learn `gate_lr_scale` times faster than the weights."""

    def __init__(self, gates: dict, lam: float, gate_lr_scale: float):
        self.gates, self.lam = gates, lam
        self.n_layers = sum(len(layers) for layers in gates.values())
        self.lr_scale = {"log_alpha": gate_lr_scale}
        self.history: list[dict] = []

    def __call__(self) -> torch.Tensor:
        return self.lam * sum(g.l0() for layers in self.gates.values() for g in layers) / self.n_layers

    def log(self, step: int) -> dict:
        z = eval_gates(self.gates)
        p_open = {k: [g.prob_open().detach().cpu().tolist() for g in v] for k, v in self.gates.items()}
        open_now = {k: int(sum((zi > 0).sum() for zi in v)) for k, v in z.items()}
        if not self.history or self.history[-1]["step"] != step:
            self.history.append({"step": step, "p_open": p_open, "heads_open": open_now})
        n_head = len(p_open[next(iter(p_open))][0])
        return {"heads_open": " ".join(f"{k} {v}/{n_head * len(self.gates[k])}" for k, v in open_now.items()),
                "l0": round(sum(sum(p) for v in p_open.values() for p in v) / self.n_layers, 3), "p_open": p_open}


def prune_once(lam: float, source: dict, data, original: dict, opts: dict, run_dir: str, rt: Runtime) -> dict:
    """Gate, train, physically prune and report for one lambda. opts: prune.py's knobs."""
    os.makedirs(run_dir, exist_ok=True)
    model, src_tok, tgt_tok = model_from_checkpoint(source)
    n_head, gate_types = model.cfg.n_head, opts["gate_types"]
    print(f"\n== lambda {lam}: gating {', '.join(gate_types)} heads of {source.get('kind')} "
          f"({model.num_params() / 1e6:.2f}M parameters)")
    report = {"lambda": lam, "gate_attn": gate_types, "params_before": model.num_params(), **original}
    torch.manual_seed(opts["seed"])
    penalty = L0Penalty(attach_gates(model, gate_types), lam, opts["gate_lr"] / opts["learning_rate"])
    model.to(rt.device)                    # with its new gates
    # the original run's settings (data, batches, dropout, smoothing), with pruning's own schedule and limits
    cfg = {**source["train_config"], "init_from": opts["ckpt"], "out_dir": run_dir, "overfit_batches": 0,
           "max_epochs": 0.0, "max_iters": opts["max_iters"],
           "max_minutes": 0.0 if opts["max_iters"] else opts["max_minutes"],
           **{k: opts[k] for k in ("learning_rate", "warmup_frac", "log_interval", "eval_interval", "eval_sentences",
                                   "device", "dtype")}}
    penalty.log(0)
    run = train_loop(model, data, cfg, rt, penalty=penalty)
    penalty.log(run.step)

    model.eval()
    z = eval_gates(penalty.gates)
    for split in ("validation", "test"):
        report[f"gated_{split}"] = bleu_of(model, data, split, rt)
    pruned, keep = prune_heads(model.cpu(), {k: [zi.cpu() for zi in v] for k, v in z.items()})
    pruned.to(rt.device).eval()
    for split in ("validation", "test"):
        report[f"pruned_{split}"] = bleu_of(pruned, data, split, rt)
    original_model = model_from_checkpoint(source)[0].to(rt.device)
    report["speed"] = speed_of({"original": original_model, "pruned": pruned}, data, rt, opts["speed_repeats"])
    report.update(params_after=pruned.num_params(), steps=run.step,
                  heads_kept={k: [len(h) for h in v] for k, v in keep.items()},
                  kept_heads_index={k: v for k, v in keep.items()},
                  gate_values={k: [zi.tolist() for zi in v] for k, v in z.items()})
    path = os.path.join(run_dir, "pruned.pt")
    save_checkpoint(path, checkpoint_of(pruned, src_tok, tgt_tok, source["train_config"], step=0, best_bleu=-1.0,
                                        pruned_from={"ckpt": opts["ckpt"], "lambda": lam, "gate_attn": gate_types}))
    report["checkpoint"] = path
    report["plots"] = plot_gates(run_dir, penalty.history, gate_types, n_head)
    with open(os.path.join(run_dir, "prune_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print_report(report, keep, n_head, opts["speed_repeats"])
    return report


def print_report(r: dict, keep: dict, n_head: int, speed_repeats: int) -> None:
    print(f"\n== pruning report (lambda {r['lambda']}, {r['steps']} steps)")
    print(heads_table(keep, n_head))
    print(f"parameters: {r['params_before']:,} -> {r['params_after']:,}")
    print(f"{'model':<10}{'val BLEU':>10}{'test BLEU':>11}{'test chrF':>11}{'decode sent/s':>15}{'encode sent/s':>15}")
    for name in ("original", "gated", "pruned"):
        v, t, sp = r[f"{name}_validation"], r[f"{name}_test"], r["speed"].get(name)
        speed = f"{sp['decode_sent_per_s']:>15.1f}{sp['encode_sent_per_s']:>15.1f}" if sp else ""
        print(f"{name:<10}{v['bleu']:>10.2f}{t['bleu']:>11.2f}{t['chrf']:>11.2f}{speed}")
    o, p = r["speed"]["original"], r["speed"]["pruned"]
    print(f"pruned vs original (interleaved, median of {speed_repeats}): decoding "
          f"{p['decode_sent_per_s'] / o['decode_sent_per_s']:.2f}x, "
          f"encoder {p['encode_sent_per_s'] / o['encode_sent_per_s']:.2f}x")
    print(f"saved {r['checkpoint']}; plots: {', '.join(r['plots'])}")


def gated_heads_kept(r: dict) -> int:
    return sum(sum(r["heads_kept"][kind]) for kind in r["gate_attn"])


def plot_sweep(out_dir: str, reports: list) -> str:
    """BLEU against the number of gated heads kept, one point per lambda: the trade-off curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    kept = [gated_heads_kept(r) for r in reports]
    bleu = [r["pruned_test"]["bleu"] for r in reports]
    ax.plot(kept, bleu, "o-", label="pruned model")
    for k, b, r in zip(kept, bleu, reports):
        ax.annotate(f"λ={r['lambda']:g}", (k, b), textcoords="offset points", xytext=(4, 4))
    ax.axhline(reports[0]["original_test"]["bleu"], color="gray", ls="--", label="original model")
    ax.set_xlabel(f"{'+'.join(reports[0]['gate_attn'])} heads kept")
    ax.set_ylabel("test BLEU (greedy)")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "tradeoff.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    opts = {k: v for k, v in globals().items() if k in KNOBS}
    lambdas = parse_lambdas(l0_lambda)
    opts["gate_types"] = [t.strip() for t in gate_attn.split(",") if t.strip()]
    source = load_checkpoint(ckpt)
    if source["kind"] != "transformer":
        raise ConfigError(f"'{ckpt}' holds a {source['kind']} model: head pruning needs a Transformer checkpoint")
    rt = setup(device, dtype)
    data = data_of_checkpoint(source, dataset)
    base = out_dir or os.path.join(os.path.dirname(ckpt) or ".", f"prune_{'_'.join(opts['gate_types'])}")
    original = evaluate_original(source, data, rt)
    reports = []
    for lam in lambdas:
        run_dir = base if len(lambdas) == 1 else os.path.join(base, f"lambda_{lam:g}")
        reports.append(prune_once(lam, source, data, original, opts, run_dir, rt))
    if len(lambdas) > 1:
        print("\n== sweep")
        print(f"{'lambda':>8}{'heads kept':>12}{'test BLEU':>11}{'decoding speed-up':>19}")
        for r in reports:
            o, p = r["speed"]["original"], r["speed"]["pruned"]
            print(f"{r['lambda']:>8g}{gated_heads_kept(r):>12}{r['pruned_test']['bleu']:>11.2f}"
                  f"{p['decode_sent_per_s'] / o['decode_sent_per_s']:>18.2f}x")
        print(f"trade-off plot: {plot_sweep(base, reports)}")


if __name__ == "__main__":
    main_guard(main, DataError)
