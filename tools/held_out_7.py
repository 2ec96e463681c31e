"""
Held-out set 7 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after sets 3 to 6. Each is put in from
outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_7
"""

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import batching  # noqa: E402
import data  # noqa: E402
import decoding  # noqa: E402
import loss  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import train  # noqa: E402


# --- model_transformer.py -------------------------------------------------------------

def causal_mask_filled_with_zero():
    """The learner's attention fills the scores of the future positions with 0 before the softmax,
    instead of -inf (the padding mask, copied from elsewhere, keeps -inf): a score of 0 is no mask,
    only an ordinary score, so in teacher-forced training every decoder position still weighs each
    token after it by exp(0) against exp(score) for its past, and can read the next target token off
    the inputs. Decoding, one step at a time with only the past in the cache, has no future to read."""
    def attend(self, q, k, v, mask=None, causal=False):
        B, H, T, Dh = q.shape
        scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)                # (B, H, T, S)
        if causal:
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, 0.0)                    # BUG: float("-inf")
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        if self.record_weights:
            self.last_weights = weights.detach()
        out = self.dropout(weights) @ v                                 # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))
    model_transformer.MultiHeadAttention.attend = attend


def cached_causal_mask_not_offset():
    """The learner's causal mask covers T queries over S keys, ones(T, S).triu(1), and is left on while
    decoding with the cache (self_attention no longer turns it off). In training T = S and it is the
    right mask; but a cached step has one query, the newest position, over the t keys of every step so
    far, and the first row of triu(1) hides all of them but the first: at every step the decoder's
    self-attention sees only <bos>, as at the first step. The mask must be offset to the query's
    place among the keys, triu(S - T + 1)."""
    def self_attention(self, x, mask=None, causal=False, cache=None):
        q, k, v = self.project(x, (self.q_proj, self.k_proj, self.v_proj))   # (B, H, T, Dh) each
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)   # (B, H, t, Dh)
            cache["k"], cache["v"] = k, v
        return self.attend(q, k, v, mask, causal)                       # (the mask below covers the cache)

    def attend(self, q, k, v, mask=None, causal=False):
        B, H, T, Dh = q.shape
        S = k.shape[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)                # (B, H, T, S)
        if causal:
            future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)   # BUG: triu(S - T + 1)
            scores = scores.masked_fill(future, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        if self.record_weights:
            self.last_weights = weights.detach()
        out = self.dropout(weights) @ v
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))
    model_transformer.MultiHeadAttention.self_attention = self_attention
    model_transformer.MultiHeadAttention.attend = attend


def sublayer_reads_unnormalised():
    """The learner's pre-LN residual puts the LayerNorm on the sub-layer's output instead of its input,
    x + norm(f(x)) for x + f(norm(x)): attention and feed-forward read the raw residual stream, the
    sqrt(D)-scaled embeddings plus every branch so far, at whatever scale it has grown to, and every
    branch adds a vector of unit variance, however little it has to say."""
    def forward(self, x, sublayer):
        if self.pre_norm:
            return x + self.dropout(self.norm(sublayer(x)))             # BUG: sublayer(self.norm(x))
        return self.norm(x + self.dropout(sublayer(x)))
    model_transformer.Residual.forward = forward


def logits_scaled_by_sqrt_d():
    """The learner multiplies the output logits by sqrt(d_model), carrying the embeddings' scale over
    to the output layer (models that tie the output to the embedding scale it by d_model^-1/2, if at
    all): the logits start 5.7 times too large, so the first loss is far above ln V, and every change
    to the output weights moves the logits 5.7 times as far."""
    def decode(self, tgt_in, memory, cache=None):
        enc_out, src_mask = memory
        start = cache["length"] if cache is not None else 0
        y = self.embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder):
            y = layer(y, enc_out, src_mask, cache["layers"][i] if cache is not None else None)
        if cache is not None:
            cache["length"] = start + tgt_in.shape[1]
        return self.out_proj(self.dec_norm(y)) * math.sqrt(self.cfg.d_model)   # BUG: no sqrt(D) on the logits
    model_transformer.Transformer.decode = decode


# --- data.py --------------------------------------------------------------------------

def cleaning_deletes_spaces():
    """The learner's cleaning step (in drop_empty) normalises the whitespace of every pair with
    "".join(s.split()) instead of " ".join(s.split()): every space is deleted, on both sides of every
    split, the validation references included, so a sentence is one run of characters, '9 7 4 8' is
    '9748', and to BLEU's 13a tokenisation each sentence is a single word. A learner who changes
    the cleaning rules bumps data.CACHE_VERSION, so cached splits are not reused."""
    def drop_empty(pairs):
        pairs = [("".join(s.split()), "".join(t.split())) for s, t in pairs]   # BUG: " ".join
        kept = [(s, t) for s, t in pairs if s.strip() and t.strip()]
        return kept, len(pairs) - len(kept)
    data.drop_empty = drop_empty
    data.CACHE_VERSION = "4-whitespace-cleaned"


# --- batching.py ----------------------------------------------------------------------

def gru_source_reversed_in_collate():
    """The learner reverses every source sentence in collate, Sutskever et al.'s trick, done in the
    data instead of the model: training and validation batches come through collate, but translate
    builds its own batches (decoding.length_sorted_batches) from the sources in their given order.
    On the toy's reversal task the model is trained to copy the reversed source it is given, and at
    translation copies the unreversed one."""
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(i)
            src[b, :len(s)], src[b, len(s)] = s[::-1], src_tok.eos_id   # BUG: reversed in training only
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = tgt_tok.bos_id, t
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, tgt_tok.eos_id
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    batching.collate = collate
    decoding.collate = collate


# --- loss.py --------------------------------------------------------------------------

def gru_loss_gradient_sign_flipped():
    """The learner's SmoothedCrossEntropy.backward returns q - p, the smoothed target distribution
    minus the softmax, instead of p - q (the direction to move the logits in, not the gradient): the
    loss the forward reports is right, but the gradient points uphill, and every optimizer step
    raises the loss."""
    @staticmethod
    @loss.once_differentiable
    def backward(ctx, grad_out):
        p, t, keep = ctx.saved_tensors
        eps, V = ctx.eps, p.shape[-1]
        grad = eps / V - p                                              # BUG: p - eps / V ...
        grad.scatter_add_(1, t, grad.new_full(t.shape, 1 - eps))       # BUG: ... and -(1 - eps) on the true token
        grad.mul_((grad_out * keep)[:, None])
        return grad.to(ctx.dtype), None, None, None
    loss.SmoothedCrossEntropy.backward = backward


# --- train.py -------------------------------------------------------------------------

def step_counted_twice():
    """The learner's loop_step moves run.step on itself, after seeding the step's draws, and
    train_loop still counts the step after it: the counter goes up by 2 per update, so max_iters=300
    stops after 150 updates, the schedule's warm-up and decay pass twice as fast, and log lines and
    evaluations fall on even step numbers only."""
    def loop_step(model, optimizer, batches, run, epochs, cfg, rt, penalty=None):
        lr = train.lr_at(train.run_progress(run.step, epochs, run.time_progress, cfg), cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        torch.manual_seed(hash((cfg["seed"], rt.rank, run.step)) % 2**63)
        run.step += 1                                                   # BUG: train_loop counts the step
        micro_batches = []
        for _ in range(cfg["grad_accum"]):
            batch, run.epoch, run.batch_in_epoch = batches.next(run.epoch, run.batch_in_epoch)
            micro_batches.append(batch)
        pad_id = batches.data.tgt_tok.pad_id
        return lr, micro_batches, train.train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty)
    train.loop_step = loop_step


def gru_model_args_swapped():
    """The learner's train_step calls model(tgt_in, src) instead of model(src, tgt_in): the model
    encodes <bos> + the target and is teacher-forced with the source (it runs only because the toy's
    source and target have the same length and one vocabulary). The target it is trained on, tgt_out,
    is then its encoder input shifted by one position, a copy; evaluation and decoding call the model
    the right way round and ask for the reversal it never learnt."""
    def train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        smoothing = 0.0 if cfg["overfit_batches"] else cfg["label_smoothing"]
        n_tok = rt.mean(sum((b[2] != pad_id).sum() for b in micro_batches).to(rt.device, torch.float32))
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro_batches):
            src, tgt_in, tgt_out = rt.to_device(*batch)
            with rt.amp:
                logits = model(tgt_in, src)                             # BUG: model(src, tgt_in)
            loss_ = train.sequence_loss(logits, tgt_out, pad_id, smoothing) / n_tok
            loss_sum += loss_.detach()
            if penalty is not None and i == 0:
                loss_ = loss_ + penalty()
            rt.backward(loss_)
        return train.update(model, optimizer, loss_sum, n_tok, cfg, rt)
    train.train_step = train_step


# --- model_rnn.py ---------------------------------------------------------------------

def gru_encoder_under_no_grad():
    """The learner's forward computes the encoder memory under torch.no_grad(), as its decoding code
    does: no gradient reaches the source embedding, the encoder GRU, the bridge or the attention's key
    projection, which keep their random initial weights; only the decoder learns, and it must read
    the source through a random encoding of it."""
    def forward(self, src, tgt_in):
        with torch.no_grad():                                           # BUG: the encoder gets no gradient
            memory = self.encode(src)
        if not self.training or self.cfg.teacher_forcing >= 1.0:
            return self.decode(tgt_in, memory)
        hidden, y, logits = memory.init, tgt_in[:, 0], []
        for t in range(tgt_in.shape[1]):
            emb = self.dropout(self.embed(self.tgt_embed, y[:, None]))
            step_logits, hidden = self.run_decoder(emb, memory, hidden)
            logits.append(step_logits)
            if t + 1 < tgt_in.shape[1]:
                use_truth = torch.rand(()).item() < self.cfg.teacher_forcing
                y = tgt_in[:, t + 1] if use_truth else step_logits[:, 0].argmax(-1)
        return torch.cat(logits, dim=1)
    model_rnn.Seq2SeqRNN.forward = forward


# -----------------------------------------------------------------------------

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs (seed 1337): Transformer final training loss 0.971 (val loss 0.575), best BLEU 32.44 (length
# ratio 0.98); GRU: final training loss 1.107 (val loss 0.753), best BLEU 17.12 (length ratio 2.17)
HELD_OUT_7 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("causal_mask_filled_with_zero",
     "loss 3.157 at step 1 against the clean run's 3.063, then below it, 0.796 at step 300 against 0.971 (val loss "
     "0.405 against 0.575); BLEU 0.0 at every evaluation against 32.4, length ratio 0.10, 0.08 and 0.04 against "
     "0.98: translations of one digit or empty, '1 5 2 3 2 8' -> '8' at step 100, every example empty at step 300",
     causal_mask_filled_with_zero, ()),
    ("cached_causal_mask_not_offset",
     "loss and val loss the clean run's to the digit (0.971, 0.575); BLEU 2.1, 1.5 and 1.7 at steps 100, 200 and "
     "300 against 6.2, 22.3 and 32.4, length ratio 2.07 against 0.98: one digit repeated to the length limit, "
     "'1 5 2 3 2 8' -> '8 8 8 8 8 8 8 8 8 8 8 8 8 8 ', '9 7 4 8' -> '8 8 8 8 8 8 8 8 8 8 8 '",
     cached_causal_mask_not_offset, ()),
    ("sublayer_reads_unnormalised",
     "loss 2.813 at step 1 against the clean run's 3.063, 1.072 at step 300 against 0.971 (val loss 0.691 against "
     "0.575); BLEU 3.7, 16.5 and 23.0 at steps 100, 200 and 300 against 6.2, 22.3 and 32.4 (seed 1338: 30.9 "
     "against 53.7): repeated digits, '1 5 2 3 2 8' -> '8 2 2 2 2 5 1', '9 7 4 8' -> '8 4 7 4'",
     sublayer_reads_unnormalised, ()),
    ("logits_scaled_by_sqrt_d",
     "loss 10.08 at step 1 against the clean run's 3.06 and 5.26 at step 25 against 2.33, then 1.156 at step 300 "
     "against 0.971 (val loss 0.751 against 0.575); BLEU 4.2, 7.5 and 21.0 at steps 100, 200 and 300 against 6.2, "
     "22.3 and 32.4 (seed 1338: 25.7 against 53.7): '1 5 2 3 2 8' -> '8 2 3 2 5 2 2', '9 7 4 8' -> '8 7 8 4'",
     logits_scaled_by_sqrt_d, ()),
    ("cleaning_deletes_spaces",
     "the examples' sources and references have no spaces, '152328' (ref '823251'); loss 3.215 at step 1 against "
     "3.063, 0.869 at step 300 against 0.971 (val loss 0.456 against 0.575); BLEU 0.0 at every evaluation against "
     "32.4, length ratio 1.00: translations at step 300 right or nearly, '152328' -> '823251', '800901' -> '109080' "
     "(ref '109008')",
     cleaning_deletes_spaces, ()),
    ("step_counted_twice",
     "log lines at steps 50, 100, ... only (none at steps 1, 25, 75, ...); loss 1.559 at step 100 against the clean "
     "run's 1.394 and 1.322 at step 300 against 0.971 (val loss 0.986 against 0.575), near the clean run's 1.275 "
     "at its step 150; BLEU 3.0, 5.7 and 5.9 at steps 100, 200 and 300 against 6.2, 22.3 and 32.4: '8 0 0 9 0 1' -> "
     "'0 8 0 0 0 0 0 0', '9 7 4 8' -> '8 7 9 9'",
     step_counted_twice, ()),
    ("gru_encoder_under_no_grad",
     "loss 1.606 at step 100 against the clean GRU's 1.541, then slow, 1.445 at step 300 against 1.107 (val loss "
     "1.161 against 0.753); BLEU 0.8, 3.4 and 4.5 at steps 100, 200 and 300 against 2.0, 9.0 and 17.1 (seed 1338: "
     "7.7 against 24.3): a digit or two of the source repeated, '1 5 2 3 2 8' -> '2 2 2 2 2 1 1 1 1 1 1 1 1 1 ', "
     "'9 7 4 8' -> '7 7 7 7 7 7 9 9 9 9 9 '",
     gru_encoder_under_no_grad, GRU),
    ("gru_model_args_swapped",
     "loss below the clean GRU's from step 25 (2.288 against 2.364), 0.584 at step 300 against 1.107, while the "
     "val loss rises, 4.754, 4.926 and 5.020 at steps 100, 200 and 300 against 1.199, 0.861 and 0.753; BLEU 0.0 "
     "against 17.1, length ratio 0.14 against 2.17: the source's first digit repeated without spaces, "
     "'8 0 0 9 0 1' -> '8888888888888888888888888888'",
     gru_model_args_swapped, GRU),
    ("gru_source_reversed_in_collate",
     "loss 1.171 at step 300 against the clean GRU's 1.107 (val loss 0.833 against 0.753); BLEU 0.4, 1.7 and 4.3 "
     "at steps 100, 200 and 300 against 2.0, 9.0 and 17.1, length ratio 1.15 against 2.17: translations start "
     "with the source's first digit, '8 0 0 9 0 1' -> '8 0 0 0 1 1', '9 7 4 8' -> '9 8 8' (seed 1338: loss 0.629 "
     "against 0.991, val loss 0.177 against 0.641, BLEU 16.2 against 24.3, every example the source copied, "
     "'9 7 4 8' -> '9 7 4 8')",
     gru_source_reversed_in_collate, GRU),
    ("gru_loss_gradient_sign_flipped",
     "loss 2.702 at step 1 (the clean GRU's), then rising, 3.98 at step 25, 27.3 at step 100 and 55.6 at step 300 "
     "against 1.107 (val loss 32.3, 53.0 and 57.0 against 0.753); BLEU 0.0 at every evaluation against 17.1, "
     "length ratio 0.14: every translation one digit repeated without spaces, '6666666666666666666666666666'",
     gru_loss_gradient_sign_flipped, GRU),
]
