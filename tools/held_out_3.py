"""Held-out set 3 of learner bugs for the toy:reverse run, each put in by monkeypatching the library
in a fresh process (no library file is edited). Run: python tools/held_out_3.py [NAME ...]
(names: those of HELD_OUT_3, plus 'clean' and 'clean_gru' for the runs without a bug)."""

import math
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project's root
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import batching  # noqa: E402
import data  # noqa: E402
import decoding  # noqa: E402
import loss  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import train  # noqa: E402

BASE = ["--dataset=toy:reverse", "--tokenizer=char", "--tie_embeddings=none", "--d_model=32", "--n_head=2",
        "--n_enc_layer=2", "--n_dec_layer=2", "--d_ff=64", "--dropout=0.0", "--batch_tokens=1500",
        "--learning_rate=3e-3", "--warmup_frac=0.1", "--max_iters=300", "--log_interval=25", "--eval_interval=100",
        "--eval_sentences=50", "--dtype=float32", "--plot=False", "--overwrite=True"]
RUN_ROOT = "/tmp/held3"

import numpy as np  # noqa: E402
import tokenizer  # noqa: E402


def _patch(owner, name: str, new) -> None:
    """owner.name = new; for a module, also every project module that imported the same object by that
    name (`from x import name`)."""
    old = getattr(owner, name)
    setattr(owner, name, new)
    if isinstance(owner, type(sys)):
        for m in list(sys.modules.values()):
            f = getattr(m, "__file__", None) or ""
            if os.path.dirname(os.path.abspath(f)) == HERE and getattr(m, name, None) is old:
                setattr(m, name, new)


# ----------------------------------------------------------------------------- Transformer

def residual_dropped():
    """Residual.forward (pre-LN) returns dropout(f(norm(x))) and forgets the `x +`: no sub-layer keeps
    a skip connection, so token identity and positions reach the top only through the attention and
    feed-forward maps, and the gradient has no short path back; the model learns much slower."""
    def forward(self, x, sublayer):
        if self.pre_norm:
            return self.dropout(sublayer(self.norm(x)))                  # BUG: x + ... forgotten
        return self.norm(x + self.dropout(sublayer(x)))
    _patch(model_transformer.Residual, "forward", forward)


def embeddings_not_scaled():
    """Transformer.embed leaves out the * sqrt(d_model): the embeddings (initialised with std
    d_model^-0.5) enter 5.7x smaller than the unit-scale sinusoidal positions, so at the start each
    token is mostly its position and the model must first grow its embeddings to tell digits apart."""
    def embed(self, table, ids, start=0):
        x = table(ids)                                                  # BUG: * math.sqrt(self.cfg.d_model) missing
        return self.embed_dropout(x + self.positions[start:start + ids.shape[1]])
    _patch(model_transformer.Transformer, "embed", embed)


def decode_cache_list_aliasing():
    """Transformer.decode_step builds the per-layer cache as `[{...}] * n_layers`: one dict shared by
    every decoder layer. While decoding, layer 2 appends its keys to layer 1's self-attention cache and
    reuses layer 1's cross-attention keys and values of the source. Teacher-forced training and the
    validation loss are untouched; greedy translations (validation BLEU) are garbled."""
    def decode_step(self, y, memory, cache):
        if cache is None:
            cache = {"length": 0, "layers": [{"self": {}, "cross": {}}] * len(self.decoder)}  # BUG: aliased dicts
        return self.decode(y[:, None], memory, cache)[:, -1], cache
    _patch(model_transformer.Transformer, "decode_step", decode_step)


def split_heads_no_transpose():
    """MultiHeadAttention.split_heads views (B, L, H*Dh) as (B, H, L, Dh) directly instead of
    (B, L, H, Dh).transpose(1, 2): each 'head' gets a block of rows cut across positions and features,
    so queries, keys and values no longer belong to the positions they are used at."""
    def split_heads(self, x):
        B, L, _ = x.shape
        return x.reshape(B, self.n_head, L, self.head_dim)              # BUG: no view(B, L, H, Dh).transpose(1, 2)
    _patch(model_transformer.MultiHeadAttention, "split_heads", split_heads)


# ----------------------------------------------------------------------------- batching, data, tokenizer

def eos_never_learned():
    """collate writes the target ids into tgt_out but not the <eos> after them (left as padding, which
    the loss ignores): the model is never taught to stop, so greedy decoding runs on to the length
    limit (1.5 x source + 10) and every translation ends in a long tail of extra digits."""
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(i)
            src[b, :len(s)], src[b, len(s)] = s, src_tok.eos_id
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = tgt_tok.bos_id, t
            tgt_out[b, :len(t)] = t                                      # BUG: tgt_out[b, len(t)] = eos_id missing
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    _patch(batching, "collate", collate)


def same_batch_every_step():
    """TrainBatches.next returns the position it was given (i) instead of the one after it (i + 1):
    the loop asks for the same position every step, so the whole run trains on the first batch of the
    first epoch (about 70 sentences) and memorises it instead of learning to reverse."""
    def next_(self, epoch, i):
        if i >= len(self.of_epoch(epoch)):
            epoch, i = epoch + 1, 0
        batch = batching.collate(self.data.splits["train"], self.of_epoch(epoch)[i], self.data.src_tok,
                                 self.data.tgt_tok)
        return batch, epoch, i                                          # BUG: should be i + 1
    _patch(batching.TrainBatches, "next", next_)


def split_tgt_reads_source():
    """Split.tgt, copy-pasted from Split.src, slices src_flat with the target offsets: every target
    the model trains on (and the validation loss scores) is its own source, so it learns to copy the
    digits, not to reverse them; validation BLEU is scored against the true reversed references."""
    def tgt(self, i):
        return self.src_flat[self.tgt_off[i]:self.tgt_off[i + 1]]        # BUG: src_flat, not tgt_flat
    _patch(data.Split, "tgt", tgt)


def char_decode_drops_first_char():
    """CharTokenizer.decode keeps ids `> offset` instead of `>= offset`: the first character id, the
    most frequent character (the space between digits), is dropped from every decoded translation,
    so hypotheses come out as one long 'word' ('82325' for '8 2 3 2 5') and BLEU's n-grams never match."""
    def decode(self, ids):
        offset = len(self.SPECIALS)
        return "".join(self.chars[i - offset] if i >= offset else "\u2047"
                       for i in ids if i > offset or i == self.unk_id)   # BUG: > instead of >=
    _patch(tokenizer.CharTokenizer, "decode", decode)


# ----------------------------------------------------------------------------- loss, training step, schedule

def smoothing_weights_swapped():
    """SmoothedCrossEntropy mixes up eps and 1 - eps: the target distribution is eps on the true token
    plus (1 - eps) / V on every token (0.1 + 0.9/V instead of 0.9 + 0.1/V), both in the loss and in
    its gradient. The model is trained towards a nearly uniform guess; the true token only wins by a little."""
    def forward(ctx, logits, target, ignore_id, eps):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        V = x.shape[-1]
        keep = (target != ignore_id).to(x.dtype)
        t = target.clamp(0, V - 1)[:, None]
        p = x.softmax(dim=-1)
        top, where = x.max(dim=-1)
        lse = top - p.gather(1, where[:, None])[:, 0].log()
        row_loss = lse - eps * x.gather(1, t)[:, 0] - (1 - eps) / V * x.sum(dim=-1)   # BUG: eps and 1 - eps swapped
        ctx.save_for_backward(p, t, keep)
        ctx.eps, ctx.dtype = eps, logits.dtype
        return (row_loss * keep).sum()

    def backward(ctx, grad_out):
        p, t, keep = ctx.saved_tensors
        eps, V = ctx.eps, p.shape[-1]
        grad = p - (1 - eps) / V                                        # BUG: swapped here too
        grad.scatter_add_(1, t, grad.new_full(t.shape, -eps))
        grad.mul_((grad_out * keep)[:, None])
        return grad.to(ctx.dtype), None, None, None
    from torch.autograd.function import once_differentiable
    _patch(loss.SmoothedCrossEntropy, "forward", staticmethod(forward))
    _patch(loss.SmoothedCrossEntropy, "backward", staticmethod(once_differentiable(backward)))


def zero_grad_before_step():
    """update() calls optimizer.zero_grad() before optimizer.step() instead of after it: every step
    wipes the gradients it just computed and AdamW steps with none (only weight decay moves the
    weights), so the model never learns."""
    def update(model, optimizer, loss_sum, n_tok, cfg, rt):
        rt.finish_backward(model, optimizer)
        norms = train.grad_norms(model)
        loss_, tokens, gnorm, gnorm_enc, gnorm_dec = torch.cat([rt.mean(loss_sum)[None], n_tok[None], norms]).tolist()
        report = dict(loss=loss_, tokens=int(tokens), gnorm=gnorm, gnorm_enc=gnorm_enc, gnorm_dec=gnorm_dec)
        if math.isfinite(loss_) and math.isfinite(gnorm):
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg["grad_clip"], norms[0])
            optimizer.zero_grad(set_to_none=True)                       # BUG: before the step, not after it
            report["update"] = rt.step(optimizer)
        else:
            report["update"] = rt.skip(optimizer, loss_)
        return report
    _patch(train, "update", update)


def cosine_goes_up():
    """lr_at's cosine decay has peak and min_lr swapped: right after the warm-up the learning rate
    falls from the peak to min_lr and then climbs back up to the peak at the end of the run. The middle
    of the run barely learns and the last steps, at the full rate, shake the weights."""
    def lr_at(progress, cfg):
        peak, low, w = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_frac"]
        if cfg["decay"] not in ("cosine", "exp", "rsqrt"):
            raise train.ConfigError(f"decay='{cfg['decay']}' is not known")
        if progress < w:
            return peak * progress / w
        if cfg["decay"] == "rsqrt":
            return peak * math.sqrt(w / progress)
        x = min(1.0, (progress - w) / max(1e-9, 1 - w))
        if cfg["decay"] == "exp":
            return peak * (low / peak) ** x
        return peak + (low - peak) * 0.5 * (1 + math.cos(math.pi * x))    # BUG: low and peak swapped
    _patch(train, "lr_at", lr_at)


# ----------------------------------------------------------------------------- decoding, evaluation

def greedy_log_softmax_over_batch():
    """greedy normalises the logits with log_softmax(dim=0), over the sentences of the batch, instead
    of over the vocabulary: each step picks the token that this sentence favours more than the other
    sentences do, not its most likely token. Training and the validation loss are untouched; greedy
    translations (validation BLEU) are wrong."""
    def greedy(model, src, bos_id, eos_id, pad_id, max_len):
        B = src.shape[0]
        memory = model.encode(src)
        y = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
        limits = torch.as_tensor(max_len, device=src.device).expand(B)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        scores = torch.zeros(B, device=src.device)
        cache, out = None, []
        for t in range(int(limits.max())):
            logits, cache = model.decode_step(y, memory, cache)
            logp = logits.float().log_softmax(dim=0)                        # BUG: over the batch, not the vocabulary
            y = logp.argmax(dim=-1)
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = y.masked_fill(done, pad_id)
            out.append(y)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    _patch(decoding, "greedy", torch.no_grad()(greedy))


def translate_source_without_eos():
    """length_sorted_batches (translate's batches) pads the source ids but does not append the <eos>
    that collate gives every training source: at validation the model reads sources it never saw in
    training, without their end marker, and greedy translations degrade."""
    def length_sorted_batches(encoded, pad_id, eos_id, batch_size):
        order = [i for i in np.argsort([len(e) for e in encoded], kind="stable") if encoded[i]]
        batches = []
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start:start + batch_size]]
            src = torch.full((len(idx), max(len(encoded[i]) for i in idx)), pad_id, dtype=torch.long)
            for b, i in enumerate(idx):
                src[b, :len(encoded[i])] = torch.tensor(encoded[i])     # BUG: + [eos_id] missing
            batches.append((idx, src))
        return batches
    _patch(decoding, "length_sorted_batches", length_sorted_batches)


def bleu_against_sources():
    """evaluate scores the greedy translations against the validation *sources* (sp.src_text) instead of
    the references (sp.tgt_text): a model that reverses correctly is scored against the unreversed
    digits, so validation BLEU stays low however well it trains."""
    real = decoding.evaluate

    @torch.no_grad()
    def evaluate(model, data_, batch_tokens, device="cpu", amp=None, split="validation", n_sentences=0,
                 n_examples=3):
        was_training = model.training
        model.eval()
        sp = data_.splits[split]
        loss_sum, n_tokens, gain = 0.0, 0, [0.0, 0]
        for i, idx in enumerate(batching.make_batches(sp.src_lens, sp.tgt_lens, batch_tokens, shuffle=False)):
            src, tgt_in, tgt_out = (t.to(device) for t in batching.collate(sp, idx, data_.src_tok, data_.tgt_tok))
            shuffled = i % 4 == 0 and len(src) > 1
            with decoding.precision(amp):
                logits = model(src, tgt_in)
                other_logits = model(src.roll(1, 0), tgt_in) if shuffled else None
            loss_ = loss.sequence_loss(logits, tgt_out, data_.tgt_tok.pad_id, 0.0)
            tokens = int((tgt_out != data_.tgt_tok.pad_id).sum())
            loss_sum, n_tokens = loss_sum + loss_.item(), n_tokens + tokens
            if shuffled:
                gain = [gain[0] + (loss.sequence_loss(other_logits, tgt_out, data_.tgt_tok.pad_id, 0.0) - loss_).item(),
                        gain[1] + tokens]
        n = len(sp) if n_sentences <= 0 else min(n_sentences, len(sp))
        hyps = decoding.translate(model, data_.src_tok, data_.tgt_tok, sp.src_text[:n], device=device, amp=amp)
        scores = decoding.score(hyps, sp.src_text[:n])                  # BUG: the sources, not sp.tgt_text
        model.train(was_training)
        loss_ = loss_sum / max(n_tokens, 1)
        return {"loss": loss_, "source_gain": gain[0] / max(gain[1], 1), "ppl": math.exp(min(loss_, 50)),
                "bleu": scores["bleu"], "bleu_lc": scores["bleu_lc"], "chrf": scores["chrf"], "sentences": n,
                "examples": [{"src": sp.src_text[i], "ref": sp.tgt_text[i], "hyp": hyps[i]}
                             for i in range(min(n_examples, n))]}
    assert real is decoding.evaluate
    _patch(decoding, "evaluate", evaluate)


# ----------------------------------------------------------------------------- GRU (run with the GRU knobs)

def _run_decoder(attention_query, next_hidden):
    """model_rnn.Seq2SeqRNN.run_decoder with two hooks for the bugs below (the clean one: the
    decoder states as the query, h_n as the next hidden state)."""
    def run_decoder(self, emb, memory, hidden):
        h0 = hidden.transpose(0, 1).contiguous()
        if self.cfg.attention == "additive":
            states, contexts = [], []
            for t in range(emb.shape[1]):
                contexts.append(self.attend(h0[-1][:, None], memory))
                step_out, h0 = self.decoder(torch.cat([emb[:, t:t + 1], contexts[-1]], dim=-1), h0)
                states.append(step_out)
            states, context, h_n = torch.cat(states, dim=1), torch.cat(contexts, dim=1), h0
        else:
            context = None
            if self.cho:
                context = memory.summary[:, None].expand(-1, emb.shape[1], -1)
                emb = torch.cat([emb, context], dim=-1)
            states, h_n = self.decoder(emb, h0)
            if self.cfg.attention == "dot":
                context = self.attend(attention_query(states, h_n), memory)
        return self.readout(states, context), next_hidden(states, h_n, self.cfg.n_dec_layer)
    return run_decoder


def gru_attention_query_final_state():
    """Luong attention in run_decoder is queried with the decoder's final state h_n[-1] (expanded over
    the steps) instead of each step's state: in teacher-forced training every target step gets the one
    context the whole sentence ends with, so attention cannot follow the source position by position.
    Decoding one step at a time gets the per-step context it never trained with."""
    def query(states, h_n):
        return h_n[-1][:, None].expand_as(states)                       # BUG: the last state for every step
    _patch(model_rnn.Seq2SeqRNN, "run_decoder", _run_decoder(query, lambda s, h_n, L: h_n.transpose(0, 1)))


def gru_hidden_from_output():
    """run_decoder hands back the top layer's last output, copied to every layer, as the next hidden
    state (`output[:, -1]` is the hidden state only of the top layer of a 2-layer GRU): teacher-forced
    training runs the sequence in one call and never sees it, but greedy decoding, one step at a time,
    overwrites the first layer's state with the second's at every step."""
    def next_hidden(states, h_n, L):
        return states[:, -1:].expand(-1, L, -1).contiguous()             # BUG: not h_n.transpose(0, 1)
    _patch(model_rnn.Seq2SeqRNN, "run_decoder", _run_decoder(lambda states, h_n: states, next_hidden))


def gru_decode_starts_from_zeros():
    """decode_step starts the decoder from a zero state (`torch.zeros_like(memory.init)`) instead of the
    bridge's memory.init that training starts from: the decoder at validation never gets the encoder's
    summary and starts from a state it never trained on."""
    def decode_step(self, y, memory, cache):
        hidden = torch.zeros_like(memory.init) if cache is None else cache["hidden"]   # BUG: not memory.init
        logits, hidden = self.run_decoder(self.embed(self.tgt_embed, y[:, None]), memory, hidden)
        return logits[:, 0], {"hidden": hidden}
    _patch(model_rnn.Seq2SeqRNN, "decode_step", decode_step)


def gru_decode_step_source_embedding():
    """decode_step, copied from encode, embeds the previous target token with src_embed instead of
    tgt_embed: training reads the target side through tgt_embed, greedy decoding through the source
    table (separate, with tie_embeddings=none), so decoding feeds the decoder inputs it never saw."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]
        logits, hidden = self.run_decoder(self.embed(self.src_embed, y[:, None]), memory, hidden)   # BUG: src_embed
        return logits[:, 0], {"hidden": hidden}
    _patch(model_rnn.Seq2SeqRNN, "decode_step", decode_step)

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
HELD_OUT_3 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, in numbers, inject, knobs)
    ("residual_dropped", "", residual_dropped, ()),
    ("embeddings_not_scaled", "", embeddings_not_scaled, ()),
    ("decode_cache_list_aliasing", "", decode_cache_list_aliasing, ()),
    ("split_heads_no_transpose", "", split_heads_no_transpose, ()),
    ("eos_never_learned", "", eos_never_learned, ()),
    ("same_batch_every_step", "", same_batch_every_step, ()),
    ("split_tgt_reads_source", "", split_tgt_reads_source, ()),
    ("char_decode_drops_first_char", "", char_decode_drops_first_char, ()),
    ("smoothing_weights_swapped", "", smoothing_weights_swapped, ()),
    ("zero_grad_before_step", "", zero_grad_before_step, ()),
    ("cosine_goes_up", "", cosine_goes_up, ()),
    ("greedy_log_softmax_over_batch", "", greedy_log_softmax_over_batch, ()),
    ("translate_source_without_eos", "", translate_source_without_eos, ()),
    ("bleu_against_sources", "", bleu_against_sources, ()),
    ("gru_attention_query_final_state", "", gru_attention_query_final_state, GRU),
    ("gru_hidden_from_output", "", gru_hidden_from_output, GRU),
    ("gru_decode_starts_from_zeros", "", gru_decode_starts_from_zeros, GRU),
    ("gru_decode_step_source_embedding", "", gru_decode_step_source_embedding, GRU),
]
CLEAN = {"clean": (None, ()), "clean_gru": (None, GRU)}


def _child(name: str) -> None:
    """In a fresh process: put the bug in, train, printed output to /dev/null."""
    os.chdir(HERE)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    torch.set_num_threads(1)
    entries = {n: (inject, knobs) for n, _, inject, knobs in HELD_OUT_3}
    inject, knobs = {**CLEAN, **entries}[name]
    if inject is not None:
        inject()
    train.main([*BASE, *knobs, f"--out_dir={RUN_ROOT}/{name}", f"--cache_dir={RUN_ROOT}/cache"])


def summary(name: str) -> tuple[float, float]:
    """(final training loss, best validation BLEU) from the run's log.jsonl (train and eval records only)."""
    import json
    path = os.path.join(RUN_ROOT, name, "log.jsonl")
    if not os.path.exists(path):
        return float("nan"), float("nan")
    records = [json.loads(line) for line in open(path)]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    bleus = [r["bleu"] for r in records if r["kind"] == "eval"]
    return (losses[-1] if losses else float("nan")), (max(bleus) if bleus else float("nan"))


def run(name: str) -> tuple[float, float]:
    import multiprocessing as mp
    p = mp.get_context("spawn").Process(target=_child, args=(name,))
    p.start()
    p.join()
    final_loss, best_bleu = summary(name)
    print(f"{name:<40} exit {p.exitcode}  final train loss {final_loss:.3f}  best BLEU {best_bleu:.2f}", flush=True)
    return final_loss, best_bleu


if __name__ == "__main__":
    names = sys.argv[1:] or [n for n, *_ in HELD_OUT_3]
    for n in names:
        run(n)
