"""
The textbook: what each model computes, written apart from model_transformer.py and model_rnn.py as
the papers write it, from a model's own weights, for one sentence alone (no batch, no padding, no
cache, no packing: only the causal mask). as_the_textbook, one of diagnostics.probe_model's probes,
compares each stage of a model with it, so a mistake in the model's own code shows where it is even
when it breaks no other property (a sub-layer that reads its input un-normalised, the positions'
sign, the decoder started from another state: the model is then consistently another function).

    stages = textbook.stages(model, src_ids, tgt_ids)    # [(stage, tensor)] in the order they run
    warnings = textbook.as_the_textbook(model, src, tgt_in, logits, data)   # [] or one warning
Leaves out: dropout (the probes run the model in eval mode), decode_step (probes.decoding_as_trained).
"""

import math

import torch
import torch.nn.functional as F

from locate import differ
from probes import encoder_calls, first_tensor

# what each stage is, for a warning: the formula the model's code must compute there
FORMULAS = {
    "source embedding": "src_embed(ids) * sqrt(D) + PE[0..S-1], PE[pos, 2i] = sin(pos / 10000^(2i/D)), "
                        "PE[pos, 2i+1] = cos(pos / 10000^(2i/D))",
    "target embedding": "tgt_embed(ids) * sqrt(D) + PE[0..T-1], the same positions as the source's",
    "self-attention weights": "softmax over the keys of q k^T / sqrt(Dh), per head, q = q_proj(h), k = "
                              "k_proj(h) of h = norm(x) (pre-LN; x itself post-LN), the keys the sentence's "
                              "own tokens (in the decoder, causal: query t sees keys 0..t)",
    "cross-attention weights": "softmax over the source positions of q k^T / sqrt(Dh), per head, q = q_proj(h) "
                               "of h = norm(y) (pre-LN), k = k_proj(encoder output)",
    "layer": "pre-LN: x = x + attn(norm(x)), then x = x + ff(norm(x)) (post-LN: x = norm(x + attn(x)), ...); "
             "attn = out_proj of the heads' softmax(q k^T / sqrt(Dh)) v put side by side per position "
             "(v = v_proj), ff = down(relu(up(h)))",
    "encoder output": "enc_norm(the last encoder layer's output) (pre-LN; post-LN: that output itself)",
    "logits": "out_proj(dec_norm(the last decoder layer's output)), no scale",
    "encoder outputs": "the encoder GRU's outputs over the embedded source read alone, one per real token, in "
                       "source order (read backwards and put back with reverse_source); embeddings times "
                       "sqrt(E) with embed_scale",
    "summary": "the encoder GRU's final state of its top layer after the sentence's last real token (both "
               "directions side by side when bidirectional): h_n[-1], not an output of some position",
    "decoder's first state": "tanh(enc_bridge(summary)), split into one state per decoder layer",
    "attention keys": "dec_key_proj(encoder outputs)",
    "attention weights": "softmax over the real source positions of s . k_j (dot: s the decoder's state at t; "
                         "additive: v^T tanh(W_s s + W_h h_j), s the state before step t)",
    "GRU logits": "out_proj(tanh(dec_readout([s_t; context_t]))), the decoder GRU run from the first state over "
                  "the embedded target inputs (with the context as its input too: additive; the summary: Cho)",
}


def stages(model, src_ids: torch.Tensor, tgt_ids: torch.Tensor, given=None) -> list[tuple[str, torch.Tensor]]:
    """src_ids (S,) a sentence's real tokens and <eos>, tgt_ids (T,) its target inputs -> [(stage,
    tensor)], e.g. [('source embedding', (S, D)), ('encoder layer 1 self-attention weights', (H, S, S)),
    ('encoder layer 1', (S, D)), ..., ('logits', (T, V))]; [] for a model of another kind. given(stage,
    tensor) -> the tensor each next stage starts from: by default the textbook's own; as_the_textbook
    gives the model's, so that a stage is computed from what the model had there (float rounding
    does not grow along the stack, a mistake is found at its own stage)."""
    out = []

    def stage(name: str, x: torch.Tensor) -> torch.Tensor:     # kept; what the next stage starts from
        out.append((name, x))
        return given(name, x) if given else x
    with torch.no_grad():
        if getattr(model, "kind", "") == "transformer":
            transformer(model, src_ids, tgt_ids, stage)
        elif getattr(model, "kind", "") == "rnn":
            rnn(model, src_ids, tgt_ids, stage)
    return out


def positions(n: int, d: int) -> torch.Tensor:
    """(n, d): PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    angles = torch.arange(n)[:, None] / 10000 ** (torch.arange(0, d, 2) / d)                  # (n, d/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)                       # sin, cos, sin, ...


def layer_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the features with the module's weights (its gain and bias, eps 1e-5: whatever kind
    of norm the model holds there); nn.Identity (post-LN's final norm) is none."""
    if isinstance(norm, torch.nn.Identity):
        return x
    return F.layer_norm(x, x.shape[-1:], getattr(norm, "weight", None), getattr(norm, "bias", None), 1e-5)


def attention(attn, queries: torch.Tensor, keys: torch.Tensor, causal: bool = False) -> tuple:
    """One MultiHeadAttention's weights: queries (T, D) over keys (S, D) -> (out (T, D), weights (H, T, S))."""
    H, Dh = attn.n_head, attn.head_dim
    if H == 0:                                          # every head pruned: out_proj adds its bias alone
        return attn.out_proj.bias.expand(len(queries), -1), queries.new_zeros(0, len(queries), len(keys))
    q = F.linear(queries, attn.q_proj.weight, attn.q_proj.bias).view(-1, H, Dh).transpose(0, 1)   # (H, T, Dh)
    k = F.linear(keys, attn.k_proj.weight, attn.k_proj.bias).view(-1, H, Dh).transpose(0, 1)      # (H, S, Dh)
    v = F.linear(keys, attn.v_proj.weight, attn.v_proj.bias).view(-1, H, Dh).transpose(0, 1)
    scores = q @ k.transpose(1, 2) / math.sqrt(Dh)                                               # (H, T, S)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    heads = (weights @ v).transpose(0, 1).reshape(len(queries), H * Dh)                         # (T, H*Dh)
    return F.linear(heads, attn.out_proj.weight, attn.out_proj.bias), weights


def sublayer(residual, x: torch.Tensor, f, pre_norm: bool) -> tuple:
    """x + f(norm(x)) (pre-LN) or norm(x + f(x)) (post-LN); f returns (out, weights or None)."""
    out, weights = f(layer_norm(residual.norm, x) if pre_norm else x)
    return (x + out if pre_norm else layer_norm(residual.norm, x + out)), weights


def feed_forward(ff, h: torch.Tensor) -> tuple:
    return F.linear(F.relu(F.linear(h, ff.up.weight, ff.up.bias)), ff.down.weight, ff.down.bias), None


def transformer(model, src_ids: torch.Tensor, tgt_ids: torch.Tensor, stage) -> None:
    """Vaswani et al. 2017 for one sentence, each stage handed to stage(name, tensor) (stages()'s)."""
    D, pre = model.cfg.d_model, model.cfg.pre_norm

    def embed(table, ids):
        return table.weight[ids] * math.sqrt(D) + positions(len(ids), D).to(table.weight)

    x = stage("source embedding", embed(model.src_embed, src_ids))             # (S, D)
    for i, layer in enumerate(model.encoder):
        x, w = sublayer(layer.res_attn, x, lambda h: attention(layer.self_attn, h, h), pre)
        stage(f"encoder layer {i + 1} self-attention weights", w)
        x, _ = sublayer(layer.res_ff, x, lambda h: feed_forward(layer.ff, h), pre)
        x = stage(f"encoder layer {i + 1}", x)
    memory = stage("encoder output", layer_norm(model.enc_norm, x))
    y = stage("target embedding", embed(model.tgt_embed, tgt_ids))              # (T, D)
    for i, layer in enumerate(model.decoder):
        y, w = sublayer(layer.res_self, y, lambda h: attention(layer.self_attn, h, h, causal=True), pre)
        y, c = sublayer(layer.res_cross, y, lambda h: attention(layer.cross_attn, h, memory), pre)
        stage(f"decoder layer {i + 1} self-attention weights", w)
        stage(f"decoder layer {i + 1} cross-attention weights", c)
        y, _ = sublayer(layer.res_ff, y, lambda h: feed_forward(layer.ff, h), pre)
        y = stage(f"decoder layer {i + 1}", y)
    stage("logits", F.linear(layer_norm(model.dec_norm, y), model.out_proj.weight))


def rnn(model, src_ids: torch.Tensor, tgt_ids: torch.Tensor, stage) -> None:
    """The GRU encoder-decoder of model_rnn.py's docstring (Sutskever, Cho, Luong, Bahdanau) for one
    sentence, each stage handed to stage(name, tensor): 'encoder outputs' (S, Hx), 'summary' (Hx,),
    "decoder's first state" (L, H), 'attention keys' (S, H) and 'attention weights' (T, S) with
    attention, 'GRU logits' (T, V)."""
    cfg = model.cfg
    scale = cfg.emb_dim ** 0.5 if cfg.embed_scale else 1.0
    dirs = 2 if cfg.bidirectional else 1
    read = src_ids.flip(0) if cfg.reverse_source else src_ids
    outputs, h_n = model.encoder(model.src_embed.weight[read][None] * scale)   # (1, S, Hx), (layers*dirs, 1, H)
    outputs = stage("encoder outputs", outputs[0].flip(0) if cfg.reverse_source else outputs[0])
    summary = stage("summary", torch.cat([h_n[-dirs + d, 0] for d in range(dirs)]))             # (Hx,)
    init = torch.tanh(F.linear(summary, model.enc_bridge.weight, model.enc_bridge.bias)).view(cfg.n_dec_layer, -1)
    init = stage("decoder's first state", init)                                 # (L, H)
    emb = model.tgt_embed.weight[tgt_ids] * scale                               # (T, E)
    keys = outputs @ model.dec_key_proj.weight.T if cfg.attention != "none" else None    # (S, H)
    if keys is not None:
        keys = stage("attention keys", keys)

    def attend(query):                                                          # (T, H) -> (T, Hx), (T, S)
        if cfg.attention == "dot":
            scores = query @ keys.T
        else:
            scores = torch.tanh(query @ model.dec_query_proj.weight.T[None] + keys[:, None]).transpose(0, 1)
            scores = (scores @ model.dec_score.weight.T)[..., 0]                # (T, S)
        weights = scores.softmax(dim=-1)
        return weights @ outputs, weights

    hidden, context = init[:, None].contiguous(), None                         # (L, 1, H)
    if cfg.attention == "additive":          # the previous state queries, the context is a GRU input
        states, contexts, weights = [], [], []
        for t in range(len(tgt_ids)):
            c, w = attend(hidden[-1])
            s, hidden = model.decoder(torch.cat([emb[t:t + 1], c], dim=-1)[None], hidden)
            states, contexts, weights = states + [s[0]], contexts + [c], weights + [w]
        states, context, weights = torch.cat(states), torch.cat(contexts), torch.cat(weights)
    else:
        cho = cfg.attention == "none" and cfg.bottleneck == "cho"
        inputs = torch.cat([emb, summary.expand(len(emb), -1)], dim=-1) if cho else emb
        states = model.decoder(inputs[None], hidden)[0][0]                      # (T, H)
        if cfg.attention == "dot":
            context, weights = attend(states)
        else:                                   # no attention: the context is Cho's summary, or nothing
            context, weights = (summary.expand(len(emb), -1) if cho else None), None
    if weights is not None:
        stage("attention weights", weights)
    readout = states if context is None else torch.cat([states, context], dim=-1)
    hidden_out = torch.tanh(F.linear(readout, model.dec_readout.weight, model.dec_readout.bias))
    stage("GRU logits", F.linear(hidden_out, model.out_proj.weight))


def as_the_textbook(model, src: torch.Tensor, tgt_in: torch.Tensor, logits: torch.Tensor, data) -> list:
    """The model's stages, in the batch (src (B, S) mixed lengths, tgt_in (B, T)), are the textbook's
    for its shortest and its longest sentence alone, each computed from the model's stage before it:
    at the first that differs, the model's code computes something else there (everything before it
    agrees). logits: model(src, tgt_in)'s. A warning, or []."""
    seen = model_stages(model, src, tgt_in)
    seen["logits" if model.kind == "transformer" else "GRU logits"] = logits
    lengths = (src != data.src_tok.pad_id).sum(dim=1)
    for b in dict.fromkeys((int(lengths.argmin()), int(lengths.argmax()))):
        s, t = int(lengths[b]), int((tgt_in[b] != data.tgt_tok.pad_id).sum())
        agreed = "it is the first stage"

        def models(stage, wanted):                      # the model's tensor of this stage, this sentence
            got = seen[stage][b].detach() if stage in seen else None
            if got is not None and got.dim() == wanted.dim() and \
                    all(g >= w for g, w in zip(got.shape, wanted.shape)):
                got = got[tuple(slice(0, n) for n in wanted.shape)]              # its sentence's positions
            return got

        def follow(stage, x):                           # the next stage starts from the model's tensor
            got = models(stage, x)
            return got if got is not None and got.shape == x.shape else x
        for stage, wanted in stages(model, src[b, :s], tgt_in[b, :t], follow):
            got = models(stage, wanted)
            if got is None:
                continue
            if got.shape == wanted.shape and agrees(stage, got, wanted):
                agreed = f"every stage up to the {stage} agrees"
                continue
            kind = stage if stage in FORMULAS else next((k for k in FORMULAS if stage.endswith(k)), "layer")
            shapes = "" if got.shape == wanted.shape else \
                f" (shape {tuple(got.shape)}, the textbook's {tuple(wanted.shape)})"
            after = (" Its attention weights agree with the textbook's: look at what follows them (the values, "
                     "the heads put side by side per position, out_proj, the feed-forward, the residual sums and "
                     "norms)." if kind == "layer" else "")
            return [("textbook_mismatch", f"the {stage} of sentence {b} ({s} source tokens) is not what the "
                     "textbook computes from the model's own stage before it and its weights, for the sentence "
                     f"alone (textbook.py), while {agreed}{shapes}: the model's code computes it otherwise. The "
                     f"textbook: {FORMULAS[kind]}.{after} (A change made on purpose belongs in textbook.py too.)")]
    return []


def agrees(stage: str, got: torch.Tensor, wanted: torch.Tensor) -> bool:
    """Two tensors of a stage, of one shape, agree as locate.differ says; attention weights, which are
    probabilities, within 0.01 (a saturated softmax, with weights 10x too large, turns the float
    rounding of its scores into differences of 5e-4)."""
    if stage.endswith("weights"):
        return not got.numel() or (got - wanted).abs().max().item() <= 0.01
    return not differ(got, wanted)


def model_stages(model, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the model computes at each stage stages() names, for the whole batch: {stage: (B, ...)},
    read by forward hooks on the Transformer's layers and from its attention weights, or from the
    GRU's Memory and attention maps, in one forward pass (attention_weights' or attention_maps'); the
    logits are the caller's."""
    seen, hooks = {}, []

    def keep(name, pre=False):
        def hook(module, args, out=None):
            seen[name] = (args if pre else (out,) if torch.is_tensor(out) else out)[0]
        return hook
    if model.kind == "transformer":
        for side, layers in (("encoder", model.encoder), ("decoder", model.decoder)):
            for i, layer in enumerate(layers):
                if i == 0:
                    embedding = "source embedding" if side == "encoder" else "target embedding"
                    hooks.append(layer.register_forward_pre_hook(keep(embedding, pre=True)))
                hooks.append(layer.register_forward_hook(keep(f"{side} layer {i + 1}")))
    try:
        with encoder_calls(model) as calls:
            if model.kind == "transformer":
                weights = model.attention_weights(src, tgt_in)
                for kind, label in (("enc", "encoder layer {} self-attention weights"),
                                    ("dec", "decoder layer {} self-attention weights"),
                                    ("cross", "decoder layer {} cross-attention weights")):
                    seen.update({label.format(i + 1): w for i, w in enumerate(weights.get(kind, []))})
            else:
                seen.update({"attention weights": model.attention_maps(src, tgt_in).get("attention")})
    finally:
        for h in hooks:
            h.remove()
    memory = calls[0][1] if calls else None     # (a forward pass that does not call model.encode: decoding
    #                                              does, so decoding_as_trained tells them apart)
    if model.kind == "transformer":
        seen["encoder output"] = first_tensor(memory) if memory is not None else None
    else:
        seen.update({"encoder outputs": getattr(memory, "outputs", None), "summary": getattr(memory, "summary", None),
                     "decoder's first state": getattr(memory, "init", None),
                     "attention keys": getattr(memory, "keys", None)})
    return {k: v for k, v in seen.items() if torch.is_tensor(v)}
