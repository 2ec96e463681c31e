"""A module for tools/prune_study.py, not a command: what attention heads do, and which to keep.
The head roles of Voita et al. 2019 ("Analyzing Multi-Head Self-Attention: Specialized Heads Do
the Heavy Lifting, the Rest Can Be Pruned"):
confidence, positional, rare-token, measured on a split read with teacher forcing. The head
importance score of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") and keeping
exactly K heads by it or at random: the baselines tools/prune_study.py sets against prune.py's L0
gates. The figures of that study: the measures with the heads each method kept, BLEU vs heads kept.
Leaves out: Voita et al.'s syntactic heads (they need a parser) and Michel et al.'s iterative
pruning (the scores are computed once, on the unpruned model).
"""

import math
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
from batching import collate, make_batches  # noqa: E402
from gates import set_head_gate  # noqa: E402
from loss import sequence_loss  # noqa: E402

KINDS = ("enc", "dec", "cross")   # encoder self, decoder self, cross-attention: Transformer.attention_modules()
MEASURES = ("confidence", "positional", "rare_token")   # the panels of the figure; also positional_prev/_next


# -----------------------------------------------------------------------------
# recording attention

def split_batches(split, src_tok, tgt_tok, batch_tokens: int, shuffle: bool = False, seed: int = 0,
                  max_batches: int = 0):
    """(src, tgt_in, tgt_out) batches of a data.Split: length-sorted (shuffle=False) as in
    train.py's evaluate, or in a seeded random order; max_batches > 0 stops early."""
    batches = make_batches(split.src_lens, split.tgt_lens, batch_tokens, shuffle=shuffle, seed=seed)
    for idx in batches[:max_batches] if max_batches > 0 else batches:
        yield collate(split, idx, src_tok, tgt_tok)


def head_counts(model) -> dict[str, list[int]]:
    """{kind: [heads per layer]} of every attention type of a Transformer."""
    return {kind: [m.n_head for m in layers] for kind, layers in model.attention_modules().items()}


# -----------------------------------------------------------------------------
# the head roles, on plain tensors. Each returns per-head sums and counts so that a split can be
# added up batch by batch: the measure is sum / count over the whole split.
# Notation: a[b, h, t, s] the weight of query t on key s; "real" = not padding.

def confidence_sums(weights: torch.Tensor, query_real: torch.Tensor,
                    key_eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """confidence_h = mean over real queries (b, t) of max_{s: key s is not <eos>} a[b, h, t, s].

    weights (B, H, T, S); query_real (B, T) bool; key_eos (B, S) bool, True at <eos> keys.
    Returns ((H,) sum of the maxima, (H,) number of queries). Voita et al. leave <eos> out; we
    read that as <eos> the key, not the query: a head with nothing to do parks its attention on
    <eos> (as BERT's heads do on [SEP], Clark et al. 2019), and counting that weight would call
    an idle head confident. Example: one query, weights [0.7 on <eos>, 0.2, 0.1] -> 0.2.
    Uniform attention over S keys without <eos> gives 1/S, a one-hot head 1."""
    top = weights.masked_fill(key_eos[:, None, None, :], 0.0).amax(dim=-1)   # (B, H, T)
    q = query_real[:, None, :].to(top.dtype)                                  # (B, 1, T)
    return (top * q).sum(dim=(0, 2)), q.sum().expand(weights.shape[1])


def positional_sums(weights: torch.Tensor, real: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Self-attention only (queries and keys are the same positions). For offset d in (-1, +1):

        share_h(d) = #{real queries t with a real key t + d, argmax_s a[b, h, t, s] = t + d}
                     / #{real queries t with a real key t + d}

    so the first token does not count against "previous" nor the last against "next": a head
    that always looks at the previous token scores exactly 1. Ties go to the first key.
    weights (B, H, T, T); real (B, T) bool. Returns {'prev': (hits, count), 'next': (hits, count)},
    each (H,). The argmax runs over every real key, <eos> included. Voita et al. call a head
    positional when either share is at least 0.9."""
    H, T = weights.shape[1], weights.shape[2]
    best = weights.argmax(dim=-1)                                  # (B, H, T) key with the largest weight
    t = torch.arange(T, device=weights.device)
    out = {}
    for name, d in (("prev", -1), ("next", 1)):
        has = real & torch.roll(real, -d, dims=1)                  # (B, T): key t + d exists and is real ...
        has &= (t + d >= 0) & (t + d < T)                          # ... and roll did not wrap around
        hit = (best == t + d) & has[:, None, :]                    # (B, H, T)
        out[name] = (hit.sum(dim=(0, 2)), has.sum().expand(H))
    return out


def rare_token_sums(weights: torch.Tensor, query_real: torch.Tensor, key_freq: torch.Tensor,
                    key_candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rare_h = share of sentences whose most-attended key is a rarest token of the sentence.

    The most-attended key of sentence b is argmax_s sum_{real t} a[b, h, t, s] (the key that
    receives the most attention over all the sentence's queries). The rarest tokens are the
    candidate keys with the smallest training-set frequency; a hit is a most-attended key whose
    frequency equals that minimum (so a repeated rare word counts at either place). <eos>, <bos>
    and padding are no candidates: a head parked on <eos> is a miss, not a rare-token head.
    weights (B, H, T, S); query_real (B, T) bool; key_freq (B, S) training counts of the key
    tokens; key_candidate (B, S) bool. Returns ((H,) hits, (H,) sentences with a candidate)."""
    received = (weights * query_real[:, None, :, None]).sum(dim=2)      # (B, H, S) attention each key gets
    best = received.argmax(dim=-1)                                       # (B, H)
    freq = key_freq.double().masked_fill(~key_candidate, math.inf)       # (B, S)
    rarest = freq.min(dim=-1).values                                     # (B,)
    has = torch.isfinite(rarest)                                         # (B,) some candidate key exists
    hit = (freq.gather(1, best) == rarest[:, None]) & has[:, None]       # (B, H)
    return hit.sum(dim=0), has.sum().expand(weights.shape[1])


def token_counts(ids: np.ndarray, vocab_size: int) -> torch.Tensor:
    """(V,) how often each token id occurs in a split's flat id array (its training frequency)."""
    return torch.from_numpy(np.bincount(ids, minlength=vocab_size)).long()


# which tokens the queries and the keys of each attention type are
SIDES = {"enc": ("src", "src"), "dec": ("tgt", "tgt"), "cross": ("tgt", "src")}


@torch.no_grad()
def head_roles(model, data, split: str = "validation",
               batch_tokens: int = 4000) -> dict[str, dict[str, list[list[float]]]]:
    """The role measures of every head over a whole split (token frequencies from data's
    'train' split): {measure: {kind: [[value per head] per layer]}}, measures 'confidence',
    'positional' (the larger of 'positional_prev' and 'positional_next'), 'rare_token'.

    Keys are source tokens for 'enc' and 'cross', target tokens (<bos> + words) for 'dec'.
    Positional is NaN for 'cross' (query and key positions belong to different sentences, so
    "the previous position" means nothing) and 'positional_next' is NaN for 'dec' (causal: it
    can only look back). Decoder self-attention's first query sees only <bos>, so every head
    has weight 1 there: its confidence leans up a little for short sentences."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    tok = {"src": data.src_tok, "tgt": data.tgt_tok}
    train = data.splits["train"]
    freq = {"src": token_counts(train.src_flat, tok["src"].vocab_size).to(device),
            "tgt": token_counts(train.tgt_flat, tok["tgt"].vocab_size).to(device)}
    sums = {}                                   # (measure, kind, layer) -> [hits (H,), count (H,)]

    def add(key, hits_count):
        old = sums.get(key, (0.0, 0.0))
        sums[key] = tuple(o + x.double().cpu() for o, x in zip(old, hits_count))

    for src, tgt_in, _ in split_batches(data.splits[split], tok["src"], tok["tgt"], batch_tokens):
        ids = {"src": src.to(device), "tgt": tgt_in.to(device)}                       # (B, S), (B, T)
        real = {s: ids[s] != tok[s].pad_id for s in ids}
        eos = {s: ids[s] == tok[s].eos_id for s in ids}
        candidate = {s: real[s] & (ids[s] != tok[s].bos_id) & ~eos[s] for s in ids}
        for kind, layers in model.attention_weights(ids["src"], ids["tgt"]).items():
            q, k = SIDES[kind]
            for i, w in enumerate(layers):
                w = w.float()
                add(("confidence", kind, i), confidence_sums(w, real[q], eos[k]))
                add(("rare_token", kind, i), rare_token_sums(w, real[q], freq[k][ids[k]], candidate[k]))
                if kind != "cross":
                    for name, hits_count in positional_sums(w, real[q]).items():
                        add((f"positional_{name}", kind, i), hits_count)
    model.train(was_training)

    n_heads = head_counts(model)

    def value(measure, kind, i):
        if (measure, kind, i) not in sums or (measure, kind) == ("positional_next", "dec"):
            return [math.nan] * n_heads[kind][i]
        hits, count = sums[(measure, kind, i)]
        return [h / c if c > 0 else math.nan for h, c in zip(hits.tolist(), count.tolist())]

    out = {m: {kind: [value(m, kind, i) for i in range(len(n_heads[kind]))] for kind in n_heads}
           for m in ("confidence", "positional_prev", "positional_next", "rare_token")}
    out["positional"] = {kind: [[nan_max(p, n) for p, n in zip(prev, nxt)]
                                for prev, nxt in zip(out["positional_prev"][kind], out["positional_next"][kind])]
                         for kind in n_heads}
    return out


def nan_max(a: float, b: float) -> float:
    """max(a, b) where NaN means "not defined": the other value, or NaN if neither is."""
    return a if math.isnan(b) else b if math.isnan(a) else max(a, b)


# -----------------------------------------------------------------------------
# head importance (Michel et al. 2019)

class HeadMask(nn.Module):
    """xi: one multiplier per head, all ones, put on an attention module as its gate (gates.set_head_gate). At xi = 1 the
    model computes what it computed without it; its gradient says how much the loss leans on each head."""

    def __init__(self, n_head: int, dtype: torch.dtype, device):
        super().__init__()
        self.xi = nn.Parameter(torch.ones(n_head, dtype=dtype, device=device))

    def forward(self) -> torch.Tensor:
        return self.xi                                               # (H,)


def head_importance(model, batches, pad_id: int, smoothing: float = 0.0, kinds: tuple | list = KINDS,
                    normalize: bool = True) -> dict[str, list[torch.Tensor]]:
    """Michel et al.'s importance of every head of the given attention types: {kind: [(H,) per layer]}.

        I_h = sum over batches x of | dL(x) / d xi_h |  at xi = 1     (Michel et al.'s E_x |dL(x)/d xi_h|,
                                                                        per batch as in their code)
        normalised per layer:  I_h / sqrt(sum_{h' in its layer} I_h'^2)   (their l2 normalisation by layer)

    L(x) is the training loss of batch x (loss.sequence_loss with the given label smoothing,
    divided by the batch's real target tokens); batches yields (src, tgt_in, tgt_out), moved to
    the model's device here. Dropout is off (the score describes the trained model, not a noisy
    copy of it). Only the masks get gradients (torch.autograd.grad): the model's .grad stays
    untouched, and the masks are removed afterwards, leaving the model as it was. A module whose
    gate is taken (an L0 gate) is refused: the score would mix the gate into what it
    measures."""
    modules = {kind: model.attention_modules()[kind] for kind in kinds}
    taken = [f"{kind} layer {i}" for kind, layers in modules.items() for i, m in enumerate(layers)
             if getattr(m, "head_gate", None) is not None]
    if taken:
        raise ValueError(f"head_importance: {', '.join(taken)} already carry a head_gate: compute importance "
                         "on the model before attaching gates")
    masks = {kind: [HeadMask(m.n_head, m.out_proj.weight.dtype, m.out_proj.weight.device) for m in layers]
             for kind, layers in modules.items()}
    live = [mask.xi for layers in masks.values() for mask in layers if mask.xi.numel()]   # 0-head modules skip xi
    scores = {kind: [torch.zeros_like(mask.xi) for mask in layers] for kind, layers in masks.items()}
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        for kind, layers in modules.items():
            for m, mask in zip(layers, masks[kind]):
                set_head_gate(m, mask)
        for batch in batches:
            src, tgt_in, tgt_out = (t.to(device) for t in batch)
            n_tokens = int((tgt_out != pad_id).sum())
            loss = sequence_loss(model(src, tgt_in), tgt_out, pad_id, smoothing) / max(n_tokens, 1)
            grads = iter(torch.autograd.grad(loss, live))
            for kind, layers in masks.items():
                for i, mask in enumerate(layers):
                    if mask.xi.numel():
                        scores[kind][i] += next(grads).detach().abs()
    finally:
        for layers in modules.values():
            for m in layers:
                set_head_gate(m, None)
        model.train(was_training)
    if normalize:
        scores = {kind: [s / s.norm().clamp_min(1e-20) for s in layers] for kind, layers in scores.items()}
    return scores


# -----------------------------------------------------------------------------
# keeping exactly K heads. A keep-set is prune.prune_heads's format: {kind: [[kept head indices]
# per layer]} for every attention type, types that are not pruned keeping all their heads.

def _keep_set(n_heads: dict, kinds: tuple | list, chosen: set) -> dict[str, list[list[int]]]:
    """The chosen (kind, layer, head) triples as a keep-set; kinds not in `kinds` keep every head."""
    return {kind: [[h for h in range(n) if kind not in kinds or (kind, i, h) in chosen]
                   for i, n in enumerate(layers)] for kind, layers in n_heads.items()}


def _check_k(k: int, n_total: int, kinds: tuple | list) -> None:
    if not 0 <= k <= n_total:
        raise ValueError(f"keep k={k} heads: the {'+'.join(kinds)} attention has {n_total} heads, "
                         f"so k must be between 0 and {n_total}")


def top_k_heads(n_heads: dict, importance: dict, k: int) -> dict[str, list[list[int]]]:
    """Keep the k heads of highest score among the types `importance` covers: any per-head score
    {kind: [(H,) per layer]}, here the layer-normalised importance. Ties go to the earlier type (enc, dec, cross order), layer, head, so equal scores
    give the same keep-set on every run. n_heads: head_counts(model)."""
    ranked = sorted(((-float(score), KINDS.index(kind), i, h) for kind, layers in importance.items()
                     for i, scores in enumerate(layers) for h, score in enumerate(scores)))
    _check_k(k, len(ranked), list(importance))
    return _keep_set(n_heads, list(importance), {(KINDS[j], i, h) for _, j, i, h in ranked[:k]})


def random_heads(n_heads: dict, kinds: tuple | list, k: int, seed: int) -> dict[str, list[list[int]]]:
    """Keep k heads of the given types drawn uniformly at random (every k-subset equally likely:
    the first k of a random permutation), reproducibly under a seed."""
    candidates = [(kind, i, h) for kind in kinds for i, n in enumerate(n_heads[kind]) for h in range(n)]
    _check_k(k, len(candidates), kinds)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return _keep_set(n_heads, kinds, {candidates[j] for j in order[:k].tolist()})


def gate_values(n_heads: dict, keep: dict) -> dict[str, list[torch.Tensor]]:
    """Keep-set -> the 0/1 gate values prune.prune_heads takes: {kind: [(H,) 1 = kept per layer]}, so
    that  prune_heads(model, gate_values(head_counts(model), keep))  removes every other head."""
    return {kind: [torch.tensor([float(h in kept) for h in range(n)])
                   for n, kept in zip(n_heads[kind], keep[kind])] for kind in keep}


def kept_vs_removed(roles: dict, keep: dict, kinds: tuple | list) -> dict[str, dict[str, float]]:
    """Mean of each role measure over the kept and over the removed heads of the given types:
    {measure: {'kept': mean, 'removed': mean}} (NaN entries, as cross-attention's positional, skipped)."""
    out = {}
    for measure in MEASURES:
        groups = {"kept": [], "removed": []}
        for kind in kinds:
            for i, values in enumerate(roles[measure][kind]):
                for h, v in enumerate(values):
                    if not math.isnan(v):
                        groups["kept" if h in keep[kind][i] else "removed"].append(v)
        out[measure] = {g: float(np.mean(v)) if v else math.nan for g, v in groups.items()}
    return out


# -----------------------------------------------------------------------------
# the figure

def plot_heads(path: str, roles: dict, importance: dict | None = None, kept: dict | None = None) -> str:
    """Layers x heads heatmaps, one panel per role measure (and one for the importance, if given),
    with a marker on each head a pruning method kept (kept: {method name: keep-set}). Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kind for kind in KINDS if kind in roles["confidence"]]
    rows = [(kind, i) for kind in kinds for i in range(len(roles["confidence"][kind]))]
    n_cols = max([len(v) for kind in kinds for v in roles["confidence"][kind]] + [1])

    def grid(values: dict) -> np.ndarray:                     # (layers of every type, heads), NaN = none
        g = np.full((len(rows), n_cols), np.nan)
        for r, (kind, i) in enumerate(rows):
            if kind in values:
                v = [float(x) for x in values[kind][i]]
                g[r, :len(v)] = v
        return g

    panels = {m.replace("_", "-"): grid(roles[m]) for m in MEASURES}
    if importance is not None:
        panels["importance (layer-normalised)"] = grid(importance)
    kept = kept or {}
    n_heads = {kind: [len(v) for v in roles["confidence"][kind]] for kind in kinds}
    pruned_kinds = {kind for keep in kept.values() for kind in kinds          # unpruned types get no markers
                    if any(len(k) < n for k, n in zip(keep[kind], n_heads[kind]))}
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    colors = ["red", "white", "orange", "magenta", "cyan", "lime", "black", "pink"]
    size = (len(panels) * (0.8 + 0.55 * n_cols) + 1.5, 1.4 + 0.4 * len(rows))
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False, sharey=True)
    for ax, (title, g) in zip(axes[0], panels.items()):
        im = ax.imshow(np.ma.masked_invalid(g), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r, c in zip(*np.nonzero(np.isfinite(g))):
            ax.text(c, r - 0.2, f"{g[r, c]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if g[r, c] < 0.5 else "black")
        for j, (name, keep) in enumerate(kept.items()):       # one marker per method, side by side in the cell
            x_off = -0.35 + 0.7 * (j + 0.5) / len(kept)
            pts = [(h + x_off, r + 0.25) for r, (kind, i) in enumerate(rows) if kind in pruned_kinds
                   for h in keep[kind][i]]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, marker=markers[j % len(markers)],
                       color=colors[j % len(colors)], edgecolors="black", linewidths=0.5, label=f"kept by {name}")
        for r in range(1, len(rows)):                         # a line between attention types
            if rows[r][0] != rows[r - 1][0]:
                ax.axhline(r - 0.5, color="white", lw=2)
        ax.set_xticks(range(n_cols))
        ax.set_xlabel("head")
        ax.set_title(title, fontsize=10)
    axes[0][0].set_yticks(range(len(rows)), [f"{kind} layer {i}" for kind, i in rows])
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    if kept:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", fontsize=7,
                   ncol=min(len(kept), 4), bbox_to_anchor=(0.45, 0.0))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_tradeoff(out_dir: str, reports: list[dict], original_bleu: float) -> str:
    """Test BLEU against the number of heads kept, one series per method (prune.py's run reports):
    the trade-off curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, style in (("l0", "o-"), ("importance", "s--"), ("random", "^:"), ("unpruned", "D")):
        runs = sorted((r for r in reports if r["method"] == method), key=lambda r: r["heads"])
        if not runs:
            continue
        counts = sorted({r["heads"] for r in runs})
        means = [np.mean([r["pruned_test"]["bleu"] for r in runs if r["heads"] == k]) for k in counts]
        line, = ax.plot(counts, means, style, label=method + (" (mean of seeds)" if method == "random" else ""))
        if method == "random":
            ax.scatter([r["heads"] for r in runs], [r["pruned_test"]["bleu"] for r in runs], s=10,
                       color=line.get_color())
        for r in runs:
            if "lambda" in r:
                ax.annotate(f"λ={r['lambda']:g}", (r["heads"], r["pruned_test"]["bleu"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    ax.axhline(original_bleu, color="gray", ls="--", label="original model")
    ax.set_xlabel(f"{'+'.join(reports[0]['gate_attn'])} heads kept")
    ax.set_ylabel("test BLEU (greedy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "tradeoff.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit("tools/heads.py is a module for tools/prune_study.py, not a command: see python tools/prune_study.py -h")
