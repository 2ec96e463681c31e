"""Held-out set 3 of learner bugs for tools/bugs.py's toy runs (a tiny Transformer, or a GRU with
Luong attention: GRU below), written apart from diagnostics.py, after it. Each is put in from
outside: a function that, called in a fresh process before train.main, replaces one function,
method or class attribute of the library in that process only (the line with the learner's mistake
is marked # BUG). No library file is edited.

    python tools/bugs.py --bugs=clean,residual_dropped          # any names of HELD_OUT_3
"""

import math
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project's root
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402,F401
from torch.autograd.function import once_differentiable  # noqa: E402

import batching  # noqa: E402
import data  # noqa: E402,F401
import decoding  # noqa: E402
import loss  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402



def _patch(owner, name: str, new) -> None:
    """owner.name = new; for a module, also in every project module that holds the same object under
    that name (a `from module import name`)."""
    old = getattr(owner, name)
    setattr(owner, name, new)
    if isinstance(owner, type(sys)):
        for m in list(sys.modules.values()):
            f = getattr(m, "__file__", None) or ""
            if f and os.path.dirname(os.path.abspath(f)) == HERE and getattr(m, name, None) is old:
                setattr(m, name, new)


# ----------------------------------------------------------------------------- Transformer

def residual_dropped():
    """model_transformer.Residual.forward (pre-LN) returns dropout(f(norm(x))) and forgets the `x +`:
    no sub-layer keeps its skip connection, so the token and its position reach the output only
    through the attention and feed-forward maps and the gradient has no short path back. The model
    barely learns: it settles on the most frequent character and translates every sentence into spaces."""
    def forward(self, x, sublayer):
        if self.pre_norm:
            return self.dropout(sublayer(self.norm(x)))                  # BUG: x + ... forgotten
        return self.norm(x + self.dropout(sublayer(x)))
    _patch(model_transformer.Residual, "forward", forward)


def decode_cache_list_aliasing():
    """model_transformer.Transformer.decode_step builds the per-layer cache as `[{...}] * n_layers`,
    one dict shared by every decoder layer: while decoding, layer 2 appends its keys and values to
    layer 1's self-attention cache and reuses layer 1's cross-attention keys and values of the source.
    Teacher-forced training and the validation loss are untouched; greedy translations (BLEU) are garbled."""
    def decode_step(self, y, memory, cache):
        if cache is None:
            cache = {"length": 0, "layers": [{"self": {}, "cross": {}}] * len(self.decoder)}  # BUG: one dict, aliased
        return self.decode(y[:, None], memory, cache)[:, -1], cache
    _patch(model_transformer.Transformer, "decode_step", decode_step)


# ----------------------------------------------------------------------------- batching, tokenizer

def same_batch_every_step():
    """batching.TrainBatches.next returns the position it was given (i) instead of the one after it
    (i + 1): the loop asks for the same position at every step, so the whole run trains on the first
    batch of the first epoch (53 sentences) and memorises it; the training loss falls below the clean
    run's while the validation loss and BLEU stay poor."""
    def next_(self, epoch, i):
        if i >= len(self.of_epoch(epoch)):
            epoch, i = epoch + 1, 0
        batch = batching.collate(self.data.splits["train"], self.of_epoch(epoch)[i], self.data.src_tok,
                                 self.data.tgt_tok)
        return batch, epoch, i                                          # BUG: the next position is i + 1
    _patch(batching.TrainBatches, "next", next_)


def char_decode_drops_first_char():
    """tokenizer.CharTokenizer.decode keeps the ids `> offset` instead of `>= offset`: the first
    character id, the most frequent character (the space between the digits), is dropped from every
    decoded translation, so a hypothesis comes out as one long word ('822533' for '8 2 2 5 3 3') and
    no BLEU n-gram matches. Training, the validation loss and the ids decoded are untouched."""
    def decode(self, ids):
        offset = len(self.SPECIALS)
        return "".join(self.chars[i - offset] if i >= offset else "\u2047"
                       for i in ids if i > offset or i == self.unk_id)   # BUG: > instead of >=
    _patch(tokenizer.CharTokenizer, "decode", decode)


# ----------------------------------------------------------------------------- loss, training step

def smoothing_weights_swapped():
    """loss.SmoothedCrossEntropy mixes up eps and 1 - eps: the target distribution is eps on the true
    token plus (1 - eps) / V on every token (0.1 + 0.9 / V instead of 0.9 + 0.1 / V), in the loss and in
    its gradient alike. The model is trained towards a nearly uniform guess in which the true token wins
    by a little: the loss stays near ln V and the translations are near random digits."""
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
        grad = p - (1 - eps) / V                                        # BUG: (the same swap) p - q off the true token
        grad.scatter_add_(1, t, grad.new_full(t.shape, -eps))           # BUG: ... and on it
        grad.mul_((grad_out * keep)[:, None])
        return grad.to(ctx.dtype), None, None, None
    _patch(loss.SmoothedCrossEntropy, "forward", staticmethod(forward))
    _patch(loss.SmoothedCrossEntropy, "backward", staticmethod(once_differentiable(backward)))


def zero_grad_before_step():
    """train.update calls optimizer.zero_grad() just before optimizer.step() instead of after it: every
    step wipes the gradients it has just computed (and clipped), and AdamW steps with none, so only
    weight decay moves the weights. The loss stays at its step-1 value and the model never learns."""
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


# ----------------------------------------------------------------------------- decoding

def greedy_log_softmax_over_batch():
    """decoding.greedy normalises the logits with log_softmax(dim=0), over the sentences of the batch,
    instead of over the vocabulary (dim=-1): each step picks the token this sentence favours more than
    the other sentences do, not its most likely one, often <unk> or <eos> after a token or two.
    Training and the validation loss are untouched; the translations (BLEU) are wrong and short."""
    @torch.no_grad()
    def greedy(model, src, bos_id, eos_id, pad_id, max_len):
        B = src.shape[0]
        memory = model.encode(src)
        y = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
        limits = torch.as_tensor(max_len, device=src.device).expand(B)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        scores = torch.zeros(B, device=src.device)
        cache, out = None, []
        for t in range(int(limits.max())):
            logits, cache = model.decode_step(y, memory, cache)         # (B, V)
            logp = logits.float().log_softmax(dim=0)                    # BUG: over the batch, not the vocabulary
            y = logp.argmax(dim=-1)
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = y.masked_fill(done, pad_id)
            out.append(y)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    _patch(decoding, "greedy", greedy)


# ----------------------------------------------------------------------------- GRU (run with the GRU knobs)

def gru_hidden_from_output():
    """model_rnn.Seq2SeqRNN.run_decoder hands back the top layer's last output, copied to every layer,
    as the next hidden state (`output[:, -1]` is the final state of the top layer only, not of a 2-layer
    GRU). Teacher-forced training runs the whole sequence in one call and never uses it, so the loss is
    the clean run's; greedy decoding, one step at a time, overwrites the first layer's state with the
    second's at every step and gets stuck repeating a digit."""
    def run_decoder(self, emb, memory, hidden):
        h0 = hidden.transpose(0, 1).contiguous()
        if self.cfg.attention == "additive":
            states, contexts = [], []
            for t in range(emb.shape[1]):
                contexts.append(self.attend(h0[-1][:, None], memory))
                step_out, h0 = self.decoder(torch.cat([emb[:, t:t + 1], contexts[-1]], dim=-1), h0)
                states.append(step_out)
            states, context = torch.cat(states, dim=1), torch.cat(contexts, dim=1)
        else:
            context = None
            if self.cho:
                context = memory.summary[:, None].expand(-1, emb.shape[1], -1)
                emb = torch.cat([emb, context], dim=-1)
            states, h_n = self.decoder(emb, h0)
            if self.cfg.attention == "dot":
                context = self.attend(states, memory)
        new_hidden = states[:, -1:].expand(-1, self.cfg.n_dec_layer, -1).contiguous()   # BUG: not h_n.transpose(0, 1)
        return self.readout(states, context), new_hidden
    _patch(model_rnn.Seq2SeqRNN, "run_decoder", run_decoder)


def gru_decode_starts_from_zeros():
    """model_rnn.Seq2SeqRNN.decode_step starts greedy decoding from a zero state
    (torch.zeros_like(memory.init)) instead of memory.init, the bridge's state that teacher-forced
    training starts from: at validation the decoder never gets the encoder's summary and starts from a
    state it never trained on. The loss is the clean run's; the translations go wrong from the first digit."""
    def decode_step(self, y, memory, cache):
        hidden = torch.zeros_like(memory.init) if cache is None else cache["hidden"]   # BUG: not memory.init
        logits, hidden = self.run_decoder(self.embed(self.tgt_embed, y[:, None]), memory, hidden)
        return logits[:, 0], {"hidden": hidden}
    _patch(model_rnn.Seq2SeqRNN, "decode_step", decode_step)


def gru_embeddings_divided():
    """model_rnn.Seq2SeqRNN.embed divides the embeddings by sqrt(E) instead of multiplying by it: the
    vectors (initialised with std E^-0.5, so that as the output layer they give unit logits) reach
    the GRUs with std 1/E = 0.016 instead of 1, 64x too small, in training and decoding alike. They
    barely move the GRU states, so the encoder hardly tells the digits apart; the model learns slowly
    and repeats one digit."""
    def embed(self, table, ids):
        return table(ids) / self.emb_mult                               # BUG: / instead of *
    _patch(model_rnn.Seq2SeqRNN, "embed", embed)


GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
HELD_OUT_3 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, in numbers, inject, knobs)
    ("residual_dropped",
     "loss 1.98 at step 300 against the clean run's 0.97 (val loss 1.80 against 0.58); BLEU 0.00 at every "
     "evaluation against 32.4: every translation is a row of spaces", residual_dropped, ()),
    ("decode_cache_list_aliasing",
     "loss 0.97 and val loss 0.58, the clean run's to the digit; BLEU 5.97 at best (4.8 at the end) against "
     "32.4: translations start right and then repeat a few digits ('8 5 5 3 5 5 5 5 5' for '8 2 3 2 5 1')",
     decode_cache_list_aliasing, ()),
    ("same_batch_every_step",
     "loss 0.56 at step 300, below the clean run's 0.97 (0.67 already at step 100), but val loss 1.79 against "
     "0.58; BLEU 11.8 at best, 8.4 at the end, against 32.4", same_batch_every_step, ()),
    ("char_decode_drops_first_char",
     "loss 0.97 and val loss 0.58, the clean run's; BLEU 0.00 at every evaluation against 32.4: the "
     "translations are the right digits without spaces ('109008' for '1 0 9 0 0 8')", char_decode_drops_first_char, ()),
    ("smoothing_weights_swapped",
     "loss 3.31 at step 1 and still 2.69 from step 100 to 300 against the clean run's 0.97 (val loss 2.73 "
     "against 0.58); BLEU 3.7 at best against 32.4, near-random digits", smoothing_weights_swapped, ()),
    ("zero_grad_before_step",
     "loss 3.06 at step 1 and 3.12 at step 300 (flat) against the clean run's 0.97; val loss 3.12 at every "
     "evaluation; BLEU 0.15 against 32.4", zero_grad_before_step, ()),
    ("greedy_log_softmax_over_batch",
     "loss 0.97 and val loss 0.58, the clean run's; BLEU 9.1 at best against 32.4: translations stop after "
     "a digit or two ('82' for '8 2 3 2 5 1') or hold <unk> marks", greedy_log_softmax_over_batch, ()),
    ("gru_hidden_from_output",
     "loss 1.11 and val loss 0.75, the clean GRU run's; BLEU 7.0 against 17.1: translations repeat one "
     "digit to the length limit ('8 2 2 2 2 2 2 2 2 2 2 2 2 2' for '8 2 3 2 5 1')", gru_hidden_from_output, GRU),
    ("gru_decode_starts_from_zeros",
     "loss 1.11 and val loss 0.75, the clean GRU run's; BLEU 7.9 against 17.1: the first digits are already "
     "wrong ('2 3 1 2 1 2 ...' for '8 2 3 2 5 1')", gru_decode_starts_from_zeros, GRU),
    ("gru_embeddings_divided",
     "loss 1.60 at step 300 against the clean GRU run's 1.11 (val loss 1.34 against 0.75); BLEU 0.58 at best "
     "against 17.1: translations repeat one digit ('5 5 5 5 ...')", gru_embeddings_divided, GRU),
]
