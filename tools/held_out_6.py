"""
Held-out set 6 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after sets 3 to 5. Each is put in from
outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_6
"""

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import data  # noqa: E402
import decoding  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402


# --- model_transformer.py -------------------------------------------------------------

def linear_weights_zero_init():
    """The learner's _init_weights fills every Linear weight with zeros, as it does the biases, instead
    of xavier_uniform_: the value projections and the attention and feed-forward layers are all zero, so
    every residual branch outputs nothing and hands back no gradient to its own weights (a stationary
    point AdamW never leaves; only the branches' output biases move). The model stays the embeddings and
    positions read by the output layer: the decoder never looks at the source."""
    def _init_weights(self, module):
        if isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=self.cfg.d_model ** -0.5)
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)                         # BUG: xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    model_transformer.Transformer._init_weights = _init_weights


def attention_masks_after_softmax():
    """The learner's attention (written out, no fused kernel) applies the causal and padding masks to
    the weights after the softmax, setting them to 0, instead of filling the scores with -inf before it:
    the rows no longer sum to 1, and what a decoder position's weights add up to depends on how the
    tokens after it scored, so teacher-forced training reads the future through the normalisation,
    which decoding, one step at a time with only the past in the cache, cannot offer."""
    def attend(self, q, k, v, mask=None, causal=False):
        B, H, T, Dh = q.shape
        scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)                # (B, H, T, S)
        weights = scores.softmax(dim=-1)                                # BUG: masks after the softmax, with 0
        if causal:
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            weights = weights.masked_fill(future, 0.0)
        if mask is not None:
            weights = weights.masked_fill(~mask, 0.0)
        if self.record_weights:
            self.last_weights = weights.detach()
        out = self.dropout(weights) @ v                                 # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))
    model_transformer.MultiHeadAttention.attend = attend


# --- decoding.py ----------------------------------------------------------------------

def translate_source_left_padded():
    """The learner's inference batching pads the sources on the left, so that every sentence ends in
    the last column (the habit of batched generation with decoder-only models), while collate pads
    the training sources on the right: in translation a short sentence's tokens start several
    positions late, at positions the model never read them at."""
    def length_sorted_batches(encoded, pad_id, eos_id, batch_size):
        order = [i for i in np.argsort([len(e) for e in encoded], kind="stable") if encoded[i]]
        batches = []
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start:start + batch_size]]
            src = torch.full((len(idx), max(len(encoded[i]) for i in idx) + 1), pad_id, dtype=torch.long)
            for b, i in enumerate(idx):
                src[b, src.shape[1] - len(encoded[i]) - 1:] = torch.tensor(encoded[i] + [eos_id])  # BUG: left
            batches.append((idx, src))
        return batches
    decoding.length_sorted_batches = length_sorted_batches


def greedy_samples_instead_of_argmax():
    """The learner's greedy loop, copied from language-model sampling code, draws each token from the
    softmax (torch.multinomial) instead of taking the most likely one: every translation is a random
    draw, and each unlikely token it picks is fed back and leads the next ones astray. Training and
    the validation loss are untouched."""
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
            logits, cache = model.decode_step(y, memory, cache)
            logp = logits.float().log_softmax(dim=-1)
            y = torch.multinomial(logp.exp(), 1)[:, 0]                  # BUG: logp.argmax(dim=-1)
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = y.masked_fill(done, pad_id)
            out.append(y)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    decoding.greedy = greedy


def gru_length_limit_from_batch_size():
    """The learner computes the decoding limit from len(src), meaning the source's length, but src is
    the padded (B, S) batch, whose len() is the number of sentences: every sentence may run to
    1.5 * B + 10 tokens (85 for a batch of 50) instead of 1.5 times its own length + 10, and a model
    that has not learnt to stop yet runs on to that limit."""
    def translate_nbest(model, src_tok, tgt_tok, sentences, beam=1, alpha=0.6, nbest=1, batch_size=64,
                        max_src_len=256, max_len_a=1.5, max_len_b=10, device="cpu", amp=None, warn=print):
        if beam == 1 and nbest > 1:
            raise ValueError(f"nbest={nbest} needs beam search: set beam to at least {nbest}")
        was_training = model.training
        model.eval()
        encoded = []
        for i, text in enumerate(sentences):
            ids = src_tok.encode(text) if text.strip() else []
            if len(ids) > max_src_len:
                warn(f"warning: input line {i + 1} has {len(ids)} tokens; truncated to {max_src_len}")
                ids = ids[:max_src_len]
            encoded.append(ids)
        out = [[("", 0.0)] * nbest for _ in sentences]
        for idx, src in decoding.length_sorted_batches(encoded, src_tok.pad_id, src_tok.eos_id, batch_size):
            src, limit = src.to(device), decoding.max_target_len(len(src), max_len_a, max_len_b)   # BUG: len(src) = B
            with decoding.precision(amp):
                if beam == 1:
                    hyps, scores = decoding.greedy(model, src, tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id, limit)
                    found = [[(decoding.strip_special(h, tgt_tok.eos_id), s)]
                             for h, s in zip(hyps.tolist(), scores.tolist())]
                else:
                    found = decoding.beam_search(model, src, tgt_tok.bos_id, tgt_tok.eos_id, limit, beam, alpha, nbest)
            for b, i in enumerate(idx):
                out[i] = [(tgt_tok.decode(ids), s) for ids, s in found[b]]
        model.train(was_training)
        return out
    decoding.translate_nbest = translate_nbest


# --- train.py -------------------------------------------------------------------------

def gru_sgd_with_adam_lr():
    """The learner swaps AdamW for SGD with momentum 0.9 and keeps the schedule tuned for Adam (peak
    3e-3): without Adam's per-parameter scaling the steps are far too small, and in the run's 300
    steps the model learns little beyond the most frequent character."""
    def make_optimizer(model, cfg, lr_scale=None):
        return torch.optim.SGD(train.param_groups(model, cfg, lr_scale), lr=cfg["learning_rate"],
                               momentum=0.9)                            # BUG: AdamW at this learning rate
    train.make_optimizer = make_optimizer


def gru_loss_skips_first_position():
    """The learner drops the first column from the loss, logits[:, 1:] against tgt_out[:, 1:], taking it
    for the <bos>; but <bos> is only in tgt_in, and tgt_out's first column is the first real target
    token: the model is never taught which token a translation starts with, and decoding starts
    every sentence with a guess the rest is conditioned on."""
    def train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        smoothing = 0.0 if cfg["overfit_batches"] else cfg["label_smoothing"]
        n_tok = rt.mean(sum((b[2] != pad_id).sum() for b in micro_batches).to(rt.device, torch.float32))
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro_batches):
            src, tgt_in, tgt_out = rt.to_device(*batch)
            with rt.amp:
                logits = model(src, tgt_in)
            loss_ = train.sequence_loss(logits[:, 1:], tgt_out[:, 1:], pad_id, smoothing) / n_tok   # BUG
            loss_sum += loss_.detach()
            if penalty is not None and i == 0:
                loss_ = loss_ + penalty()
            rt.backward(loss_)
        return train.update(model, optimizer, loss_sum, n_tok, cfg, rt)
    train.train_step = train_step


def gru_cosine_without_half_shift():
    """The learner writes the cosine decay as low + (peak - low) * cos(pi x), without the (1 + cos) / 2:
    the rate falls to min_lr half way through the decay and then goes negative, down to -peak, so
    the second half of the run climbs the loss instead of descending it."""
    def lr_at(progress, cfg):
        peak, low, w = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_frac"]
        if cfg["decay"] not in ("cosine", "exp", "rsqrt"):
            raise train.ConfigError(f"decay='{cfg['decay']}' is not known: use one of cosine, exp, rsqrt")
        if cfg["decay"] == "rsqrt" and w <= 0:
            raise train.ConfigError("decay='rsqrt' needs a warm-up (lr = peak * sqrt(w / p)): set warmup_frac > 0")
        if progress < w:
            return peak * progress / w
        if cfg["decay"] == "rsqrt":
            return peak * math.sqrt(w / progress)
        x = min(1.0, (progress - w) / max(1e-9, 1 - w))
        if cfg["decay"] == "exp":
            return peak * (low / peak) ** x
        return low + (peak - low) * math.cos(math.pi * x)              # BUG: 0.5 * (1 + cos(pi x))
    train.lr_at = lr_at

# --- tokenizer.py ---------------------------------------------------------------------

def char_ids_without_special_offset():
    """The learner numbers the characters from 0, forgetting that ids 0-3 are <pad>, <bos>, <eos> and
    <unk>: the four most frequent characters (the space first) share their ids with the specials, so
    spaces are padding, a digit is <eos>, and decode, which knows the offset, reads every id wrong. A
    learner who changes how text becomes ids bumps data.CACHE_VERSION, so cached splits are not reused."""
    def __init__(self, chars):
        self.chars = list(chars)
        self.vocab_size = len(self.SPECIALS) + len(self.chars)
        self.char_to_id = {c: i for i, c in enumerate(self.chars)}     # BUG: i + len(self.SPECIALS)
    tokenizer.CharTokenizer.__init__ = __init__
    data.CACHE_VERSION = "4-char-ids-from-0"


# --- model_rnn.py ---------------------------------------------------------------------

def gru_summary_mean_of_outputs():
    """The learner's bridge reads the mean of the encoder outputs over all S positions (the padded
    ones' zeros included) instead of the final state h_n: the decoder starts from a blur of every
    position, diluted by the batch's padding, in which the source's last digit, the one it must
    produce first, no longer stands out."""
    def encode(self, src):
        src_mask = src != self.cfg.pad_id
        lengths = src_mask.sum(dim=1)
        if self.cfg.reverse_source:
            order = model_rnn.reversed_order(lengths, src.shape[1])
            src = src.gather(1, order)
        x = self.dropout(self.embed(self.src_embed, src))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        if self.cfg.reverse_source:
            out = out.gather(1, order[:, :, None].expand_as(out))
        summary = out.mean(dim=1)                                       # BUG: the top layer's h_n, per direction
        init = torch.tanh(self.enc_bridge(summary)).view(src.shape[0], self.cfg.n_dec_layer, -1)
        keys = self.dec_key_proj(out) if self.cfg.attention != "none" else None
        return model_rnn.Memory(out, keys, src_mask, init, summary)
    model_rnn.Seq2SeqRNN.encode = encode


# -----------------------------------------------------------------------------

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs (seed 1337): Transformer final training loss 0.971 (val loss 0.575), best BLEU 32.44 (length
# ratio 0.98); GRU: final training loss 1.107 (val loss 0.753), best BLEU 17.12 (length ratio 2.17)
HELD_OUT_6 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("linear_weights_zero_init",
     "loss 2.708 at step 1 against the clean run's 3.063, then flat at 1.63-1.66 from step 100 to 300 against "
     "0.971 (val loss 1.383 against 0.575); BLEU 0.8 against 32.4, length ratio 2.21 against 0.98: one output "
     "for every source, run to the length limit, '2 5 7 7 7 7 7 0 5 7 7 7 7 7'",
     linear_weights_zero_init, ()),
    ("attention_masks_after_softmax",
     "loss 0.766 at step 300 against the clean run's 0.971, val loss 0.346 against 0.575 (both better); BLEU 0.0 "
     "at every evaluation against 32.4, length ratio 0.15 against 0.98: translations of a digit or two, or "
     "empty, '1 5 2 3 2 8' -> '8 5', '9 7 4 8' -> ' 8'",
     attention_masks_after_softmax, ()),
    ("translate_source_left_padded",
     "loss and val loss the clean run's to the digit (0.971, 0.575); BLEU 8.1 against 32.4, length ratio 2.01 "
     "against 0.98: translations start near the right digits and run on, '9 7 4 8' -> '4 8 4 7 9 9 8 4 7 8 8', "
     "'8 0 0 9 0 1' -> '0 1 9 0 8 1 0 1 0 8 8 0 8 1'",
     translate_source_left_padded, ()),
    ("greedy_samples_instead_of_argmax",
     "loss and val loss the clean run's (0.971, 0.575); BLEU 4.9, 7.7 and 18.3 at steps 100, 200 and 300 "
     "against 6.2, 22.3 and 32.4 (length ratio 0.93 against 0.98): stray digits and spaces, '1 5 2 3 2 8' -> "
     "'2 8 2 5 1 ', '8 0 0 9 0 1' -> '1 0 9  0 8', at step 200 '3 8 2 5 6 1 24'",
     greedy_samples_instead_of_argmax, ()),
    ("char_ids_without_special_offset",
     "loss 3.462 at step 1 against 3.063, 1.025 at step 300 against 0.971 (val loss 0.623 against 0.575); "
     "BLEU 0.0 at every evaluation against 32.4, length ratio 0.10: translations of one character or "
     "none, '8 0 0 9 0 1' -> '7', '9 7 4 8' -> ' '",
     char_ids_without_special_offset, ()),
    ("gru_summary_mean_of_outputs",
     "loss 1.164 at step 300 against the clean GRU's 1.107 (val loss 0.827 against 0.753); BLEU 0.4, 4.1 and 7.3 "
     "at steps 100, 200 and 300 against 2.0, 9.0 and 17.1: the first digits right, then one digit repeated, "
     "'8 0 0 9 0 1' -> '1 0 0 0 0 0 0 0 8 8 8', '9 7 4 8' -> '8 4 7 7 7 7 7 7'",
     gru_summary_mean_of_outputs, GRU),
    ("gru_loss_skips_first_position",
     "loss 2.509 at step 1 against the clean GRU's 2.702 and 1.396 at step 300 against 1.107; val loss 1.525, "
     "1.505, 1.460 at steps 100, 200, 300 against 1.199, 0.861, 0.753; BLEU 0.6 against 17.1: every "
     "translation starts with a space, then one digit repeated, '8 0 0 9 0 1' -> ' 8 8 8 8 8 8 8 8 8 8 8 8 8 8'",
     gru_loss_skips_first_position, GRU),
    ("gru_sgd_with_adam_lr",
     "the logged lr the clean GRU's; loss 2.576 at step 50 against 1.936, then flat at 2.19-2.22 from step 100 "
     "to 300 against 1.107 (val loss 2.09 against 0.753); BLEU 0.0 at every evaluation against 17.1, length "
     "ratio 0.00: every translation is spaces only",
     gru_sgd_with_adam_lr, GRU),
    ("gru_length_limit_from_batch_size",
     "loss and val loss the clean GRU's to the digit (1.107, 0.753); BLEU 6.7 against 17.1, length ratio 5.26 "
     "against 2.17: translations start as the clean GRU's do and run on for 40 digits and more, '9 7 4 8' -> "
     "'8 4 9 9 9 9 7 9 9 9 7 9 9 9 7 9 9 9 7 ...'",
     gru_length_limit_from_batch_size, GRU),
    ("gru_cosine_without_half_shift",
     "the logged lr 2.09e-03 at step 100 against 2.54e-03, then negative, -1.14e-03 at step 200 and -2.98e-03 "
     "at step 300; the loss falls to 1.54 at step 100 (the clean GRU's), then climbs to 2.11 at step 200 and "
     "28.4 at step 300 (val loss 33.2 against 0.753); BLEU 1.6 at step 100, then 0.0 against 17.1: "
     "'7777777777777777777777777777' for every source",
     gru_cosine_without_half_shift, GRU),
]
