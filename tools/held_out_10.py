"""
Held-out set 10 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after sets 3 to 9. Each is put in from
outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_10
"""

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import batching  # noqa: E402
import decoding  # noqa: E402
import loss as loss_mod  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import train  # noqa: E402


# --- batching.py ----------------------------------------------------------------------

def _collate_tgt_in_drops_last():
    def collate(split, idx, src_tok, tgt_tok):
        B = len(idx)
        S, T = int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1
        src = np.full((B, S), src_tok.pad_id, dtype=np.int64)
        tgt_in = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        tgt_out = np.full((B, T), tgt_tok.pad_id, dtype=np.int64)
        for b, i in enumerate(idx):
            s, t = split.src(i), split.tgt(i)
            src[b, :len(s)], src[b, len(s)] = s, src_tok.eos_id
            tgt_in[b, 0], tgt_in[b, 1:len(t)] = tgt_tok.bos_id, t[:-1]      # BUG: tgt_in[b, 1:len(t) + 1] = t
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, tgt_tok.eos_id
        return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)
    batching.collate = collate
    decoding.collate = collate


def tgt_in_drops_last_token():
    """The learner builds the decoder input GPT-style, 'the target without its last token', tgt_in =
    <bos> + t[:-1], while tgt_out is t + <eos> as before: the last target token is never an input, so
    at the position where the model must say <eos> it reads <pad> instead of the last token. In
    translation the decoder reads the last token it wrote there, an input it was never trained on at
    that point, and does not know that the sentence is over."""
    _collate_tgt_in_drops_last()


# --- loss.py --------------------------------------------------------------------------

def loss_softmax_over_rows():
    """The learner's SmoothedCrossEntropy.forward takes the softmax of the (N, V) logits over dim=0, the
    N target positions of the batch, instead of over the vocabulary (dim=-1): p is then how this
    position's logit for a token compares with the other positions' logits for it, and both the loss
    (its logsumexp is computed from p) and the gradient p - q are those of the wrong distribution: the
    wrong tokens of a position are no longer pushed down by its own softmax."""
    def forward(ctx, logits, target, ignore_id, eps):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        V = x.shape[-1]
        keep = (target != ignore_id).to(x.dtype)
        t = target.clamp(0, V - 1)[:, None]
        p = x.softmax(dim=0)                                         # BUG: x.softmax(dim=-1)
        top, where = x.max(dim=-1)
        lse = top - p.gather(1, where[:, None])[:, 0].log()
        row_loss = lse - (1 - eps) * x.gather(1, t)[:, 0] - eps / V * x.sum(dim=-1)
        ctx.save_for_backward(p, t, keep)
        ctx.eps, ctx.dtype = eps, logits.dtype
        return (row_loss * keep).sum()
    loss_mod.SmoothedCrossEntropy.forward = staticmethod(forward)


# --- train.py -------------------------------------------------------------------------

def _loop_step_new_optimizer(model, optimizer, batches, run, epochs, cfg, rt, penalty=None):
    optimizer = train.make_optimizer(model, cfg)                    # BUG: use the optimizer made once in main()
    lr = train.lr_at(train.run_progress(run.step, epochs, run.time_progress, cfg), cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    torch.manual_seed(hash((cfg["seed"], rt.rank, run.step)) % 2**63)
    micro_batches = []
    for _ in range(cfg["grad_accum"]):
        batch, run.epoch, run.batch_in_epoch = batches.next(run.epoch, run.batch_in_epoch)
        micro_batches.append(batch)
    pad_id = batches.data.tgt_tok.pad_id
    return lr, micro_batches, train.train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty)


def optimizer_rebuilt_every_step():
    """The learner builds the optimizer inside the training loop, at the top of each step: AdamW's
    moment estimates start from zero at every update, so each step is Adam's first step, whose
    bias-corrected update is lr * g / |g| element by element: a sign-of-the-gradient step of the full
    learning rate on every weight, with no averaging over steps and no per-parameter scale."""
    train.loop_step = _loop_step_new_optimizer


def gru_token_mean_moved_to_lr():
    """The learner sums the loss over the batch's target tokens and divides the learning rate by their
    number instead (lr / n_tok rather than loss / n_tok: the same update for SGD, where the step is lr
    times the gradient). AdamW divides each gradient by its own running scale, so the size of the loss
    does not matter to it, and the 1 / n_tok (about 1/700 here) is left on the step alone: every update
    is some 700 times smaller than the schedule's. The loss reported is still the mean per token."""
    def train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        smoothing = 0.0 if cfg["overfit_batches"] else cfg["label_smoothing"]
        n_tok = rt.mean(sum((b[2] != pad_id).sum() for b in micro_batches).to(rt.device, torch.float32))
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] / n_tok.item()                   # BUG: leave the schedule's rate alone
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro_batches):
            src, tgt_in, tgt_out = rt.to_device(*batch)
            with rt.amp:
                logits = model(src, tgt_in)
            loss = train.sequence_loss(logits, tgt_out, pad_id, smoothing)   # BUG: ... / n_tok
            loss_sum += loss.detach() / n_tok
            if penalty is not None and i == 0:
                loss = loss + penalty()
            rt.backward(loss)
        return train.update(model, optimizer, loss_sum, n_tok, cfg, rt)
    train.train_step = train_step


def gru_dropout_as_keep_prob():
    """The learner, used to TensorFlow 1's keep_prob, hands the model 1 - dropout where PyTorch's
    nn.Dropout (and nn.GRU's dropout) expect the probability of DROPPING a unit: with dropout=0 every
    dropout layer drops everything in training (the embeddings, the readout, between the GRU layers),
    while in eval mode (validation, translation) nothing is dropped."""
    def build_model(cfg, src_tok, tgt_tok, verbose=True):
        if cfg["tie_embeddings"] not in ("all", "output", "none"):
            raise train.ConfigError(f"tie_embeddings='{cfg['tie_embeddings']}' is not known")
        shared = dict(src_vocab=src_tok.vocab_size, tgt_vocab=tgt_tok.vocab_size, pad_id=src_tok.pad_id,
                      n_enc_layer=cfg["n_enc_layer"], n_dec_layer=cfg["n_dec_layer"],
                      dropout=1.0 - cfg["dropout"],                     # BUG: dropout=cfg["dropout"]
                      tie_output=cfg["tie_embeddings"] != "none", share_src_tgt=cfg["tie_embeddings"] == "all")
        inner = cfg["dropout"] if cfg["inner_dropout"] else 0.0
        model = train.Transformer(train.TransformerConfig(**shared, d_model=cfg["d_model"], n_head=cfg["n_head"],
                                                          d_ff=cfg["d_ff"], attn_dropout=inner, ff_dropout=inner,
                                                          pre_norm=cfg["pre_norm"], attn_impl=cfg["attn_impl"]),
                                  verbose) if cfg["arch"] == "transformer" \
            else train.Seq2SeqRNN(train.RNNConfig(**shared, **{k: cfg[k] for k in train.rnn_knobs}), verbose)
        return train.speed_up(model)
    train.build_model = build_model


# --- model_transformer.py -------------------------------------------------------------

def attention_weights_detached():
    """The learner keeps the attention weights for plotting and, to keep the graph out of them, writes
    weights = scores.softmax(dim=-1).detach() and goes on with those same weights: no gradient flows
    through any attention score, so the query and key projections keep their random initial weights,
    and every attention (the decoder's over the source included) keeps the pattern they give it at
    initialisation; only the values, the feed-forward layers and the embeddings learn."""
    def attend(self, q, k, v, mask=None, causal=False):
        B, H, T, Dh = q.shape
        scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)
        if causal:
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1).detach()                       # BUG: no .detach() (only on the copy kept)
        if self.record_weights:
            self.last_weights = weights
        out = self.dropout(weights) @ v
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))
    model_transformer.MultiHeadAttention.attend = attend


def decode_projections_all_query():
    """The learner's shortcut for one position (a cached decoding step) in MultiHeadAttention.project
    writes [split_heads(self.q_proj(x)) for proj in projections] (the comprehension's variable unused):
    during translation the new position's key and value, in every decoder self-attention, are its
    query projection. Teacher-forced training and the validation loss go through the stacked path and
    are unharmed; only the translations are made with attention weights the model never learnt."""
    def project(self, x, projections):
        if x.shape[1] == 1:
            return [self.split_heads(self.q_proj(x)) for proj in projections]   # BUG: proj(x)
        weight = torch.cat([proj.weight for proj in projections])
        bias = torch.cat([proj.bias for proj in projections])
        return [self.split_heads(t) for t in torch.nn.functional.linear(x, weight, bias).chunk(len(projections), dim=-1)]
    model_transformer.MultiHeadAttention.project = project


# --- model_rnn.py ---------------------------------------------------------------------

def gru_gate_biases_one():
    """The learner carries over the LSTM habit of starting the forget gate's bias at 1 and fills every
    bias of both GRUs with 1 (bias_ih and bias_hh hold the reset, update and candidate gates alike):
    the update gate starts at sigmoid(2) = 0.88, so each step keeps 88% of the old state, and the
    candidate state starts pushed towards +1."""
    original = model_rnn.Seq2SeqRNN.__init__

    def __init__(self, cfg, verbose=True):
        original(self, cfg, verbose)
        for gru in (self.encoder, self.decoder):
            for name, p in gru.named_parameters():
                if name.startswith("bias"):
                    nn.init.ones_(p)                                   # BUG: leave GRU biases at torch's init
    model_rnn.Seq2SeqRNN.__init__ = __init__


def gru_logits_squashed_by_tanh():
    """The learner puts the tanh after the output layer instead of before it: out_proj's logits are
    squashed into [-1, 1], so no token can get a probability above e / (e + (V - 1) / e), about 0.35
    with this vocabulary; the loss cannot fall below about 1 nat per token and its gradient through
    the saturated tanh keeps shrinking."""
    def readout(self, states, context):
        h = states if context is None else torch.cat([states, context], dim=-1)
        return torch.tanh(self.out_proj(self.dropout(self.dec_readout(h))))  # BUG: out_proj(dropout(tanh(dec_readout(h))))
    model_rnn.Seq2SeqRNN.readout = readout


def gru_decode_step_unprojected_keys():
    """The learner's one-step decoder for translation, written out by hand, scores the new state
    against the encoder outputs (memory.outputs) instead of the projected keys (memory.keys) that the
    teacher-forced decoder was trained with: the widths match (H), so it runs, but in translation every
    step's attention lands where the untrained dot products with the raw states put it. Training and the
    validation loss are unharmed."""
    def decode_step(self, y, memory, cache):
        hidden = memory.init if cache is None else cache["hidden"]
        h0 = hidden.transpose(0, 1).contiguous()
        states, h_n = self.decoder(self.embed(self.tgt_embed, y[:, None]), h0)      # (B, 1, H)
        scores = states @ memory.outputs.transpose(1, 2)                # BUG: memory.keys.transpose(1, 2)
        scores = scores.masked_fill(~memory.mask[:, None, :], float("-inf"))
        context = scores.softmax(dim=-1) @ memory.outputs
        return self.readout(states, context)[:, 0], {"hidden": h_n.transpose(0, 1)}
    model_rnn.Seq2SeqRNN.decode_step = decode_step


GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs (this set's run_one.py, CPU): Transformer training loss 1.394, 1.108, 0.971 at steps 100, 200, 300,
# val loss 1.058, 0.694, 0.575, BLEU 6.24, 22.28, 32.44, length ratio 1.59, 1.09, 0.98; GRU: training loss 1.541,
# 1.229, 1.107, val loss 1.199, 0.861, 0.753, BLEU 1.99, 9.02, 17.12, length ratio 2.21, 2.20, 2.17.
# Tried and dropped as harmless (about as good as the clean run, or better): the training batches unshuffled,
# length-sorted every epoch (BLEU 38.9); nn.ModuleList([layer] * n), one layer repeated (36.7); the pre-LN residual
# carrying the normalised x (x = norm(x); x + f(x)) (32.1); for the GRU: tgt_in = <bos> + t[:-1] (15.5 against 17.1);
# a new AdamW every step (48.3); attention weights detached (14.6); dot scores divided by H (33.4); one nn.GRU for
# encoder and decoder (19.8); the readout given [state; state] instead of [state; context] (19.1); the bridge fed
# h_n[0], the bottom layer (26.3). Kept out: the loss's keep mask inverted (target == ignore_id: only padding is
# trained; GRU BLEU 0.00), too near the taken loss_over_padding, on the same line.
HELD_OUT_10 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("tgt_in_drops_last_token",
     "loss 1.283, 0.998 and 0.894 at steps 100, 200, 300, below the clean run's 1.394, 1.108 and 0.971 (val loss "
     "0.883, 0.570, 0.486 against 1.058, 0.694, 0.575); BLEU 3.7, 14.4 and 17.6 against 6.2, 22.3 and 32.4, length "
     "ratio 2.14 against 0.98: the right digits first, then on to the length limit, '1 5 2 3 2 8' -> "
     "'8 2 3 2 5 8 1 2 5 1 1 3 2 8 ', '9 7 4 8' -> '8 4 7 9 4 7 8 9 7 4 8 '",
     tgt_in_drops_last_token, ()),
    ("loss_softmax_over_rows",
     "loss 7.711 at step 1 against the clean run's 3.063, then 8.0, 8.6 and 8.8 at steps 100, 200, 300 (rising) "
     "against 1.394, 1.108, 0.971; val loss 7.54, 7.96, 7.91 against 1.058, 0.694, 0.575; BLEU 0.60, 0.63 and 0.67 "
     "against 6.2, 22.3 and 32.4, length ratio 2.21: one or two digits repeated to the length limit, "
     "'1 5 2 3 2 8' -> '3 3 3 8 3 3 3 8 3 3 3 3 3 3 ', '9 7 4 8' -> '3 3 3 3 3 3 3 3 3 3 3 '",
     loss_softmax_over_rows, ()),
    ("optimizer_rebuilt_every_step",
     "loss 1.463, 1.225 and 1.096 at steps 100, 200, 300 against the clean run's 1.394, 1.108 and 0.971 (val loss "
     "1.154, 0.843, 0.730 against 1.058, 0.694, 0.575); BLEU 3.5, 14.9 and 21.2 against 6.2, 22.3 and 32.4, length "
     "ratio 1.03 against 0.98: '1 5 2 3 2 8' -> '8 2 2 8 2 5', '9 7 4 8' -> '8 4 7 8'",
     optimizer_rebuilt_every_step, ()),
    ("attention_weights_detached",
     "loss 1.444, 1.319 and 1.277 at steps 100, 200, 300 against the clean run's 1.394, 1.108 and 0.971 (val loss "
     "1.095, 0.987, 0.935 against 1.058, 0.694, 0.575); BLEU 7.2, 8.4 and 10.8 against 6.2, 22.3 and 32.4, length "
     "ratio 1.10 against 0.98: '1 5 2 3 2 8' -> '2 5 1 2 8', '8 0 0 9 0 1' -> '0 8 0 8 0 0 1', '9 7 4 8' -> '7 9 4 9'",
     attention_weights_detached, ()),
    ("decode_projections_all_query",
     "training loss and val loss exactly the clean run's (1.394, 1.108, 0.971; val 1.058, 0.694, 0.575); BLEU 1.34, "
     "0.64 and 0.41 at steps 100, 200, 300 (falling) against 6.2, 22.3 and 32.4, length ratio 0.50, 0.47, 0.39 against "
     "1.59, 1.09, 0.98: empty or one-digit translations, '1 5 2 3 2 8' -> '', '9 7 4 8' -> '9'",
     decode_projections_all_query, ()),
    ("gru_dropout_as_keep_prob",
     "loss 2.708 from step 1 to step 300 against the clean GRU's 2.702 at step 1, then 1.541, 1.229 and 1.107 at "
     "steps 100, 200, 300; val loss 2.702 at every evaluation against 1.199, 0.861, 0.753; BLEU 0.00 at steps 100, "
     "200 and 300 against 2.0, 9.0 and 17.1, length ratio 0.14: the same string of digits without spaces for every "
     "sentence, '1 5 2 3 2 8' -> '5455475457545754575457545754'",
     gru_dropout_as_keep_prob, GRU),
    ("gru_token_mean_moved_to_lr",
     "loss 2.702 at step 1 (as the clean GRU), then 2.679, 2.660 and 2.654 at steps 100, 200, 300 against 1.541, "
     "1.229 and 1.107 (the learning rates printed are the clean run's); val loss 2.673, 2.653, 2.649 against 1.199, "
     "0.861, 0.753; BLEU 0.00 at every evaluation against 2.0, 9.0 and 17.1, length ratio 0.11, 0.01, 0.00: "
     "translations of spaces only, '8 0 0 9 0 1' -> 28 spaces",
     gru_token_mean_moved_to_lr, GRU),
    ("gru_gate_biases_one",
     "loss 2.760 at step 1 against the clean GRU's 2.702, then 2.146, 1.534 and 1.383 at steps 100, 200, 300 against "
     "1.541, 1.229 and 1.107 (val loss 2.014, 1.230, 1.091 against 1.199, 0.861, 0.753); BLEU 0.00, 1.87 and 4.47 "
     "against 2.0, 9.0 and 17.1, length ratio 0.00 (spaces only), 1.22, 1.03 against 2.21, 2.20, 2.17: "
     "'1 5 2 3 2 8' -> '2 2 2 2 5 1', '8 0 0 9 0 1' -> '9 9 9 0 0 0', '9 7 4 8' -> '9 9 9 9'",
     gru_gate_biases_one, GRU),
    ("gru_logits_squashed_by_tanh",
     "loss 1.838, 1.618 and 1.543 at steps 100, 200, 300 against the clean GRU's 1.541, 1.229 and 1.107 (val loss "
     "1.657, 1.433, 1.375 against 1.199, 0.861, 0.753); BLEU 1.8, 6.7 and 7.9 against 2.0, 9.0 and 17.1, length "
     "ratio 2.21 against 2.17: a right first digit or two, then repeats, '1 5 2 3 2 8' -> "
     "'8 2 2 2 2 2 5 1 5 5 5 5 5 5 ', '8 0 0 9 0 1' -> '1 0 0 0 0 0 0 0 0 0 0 0 0 0 '",
     gru_logits_squashed_by_tanh, GRU),
    ("gru_decode_step_unprojected_keys",
     "training loss and val loss exactly the clean GRU's (1.541, 1.229, 1.107; val 1.199, 0.861, 0.753); BLEU 1.1, "
     "2.1 and 3.3 at steps 100, 200, 300 against 2.0, 9.0 and 17.1, length ratio 2.11 against 2.17: "
     "'1 5 2 3 2 8' -> '2 1 5 1 1 1 1 1 1 1 1 1 1 1 ', '9 7 4 8' -> '8 9 9 9 9 9 9 9 9 9 9'",
     gru_decode_step_unprojected_keys, GRU),
]
