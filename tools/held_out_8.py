"""
Held-out set 8 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after sets 3 to 7. Each is put in from
outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_8
"""

import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import data  # noqa: E402
import decoding  # noqa: E402
import loss  # noqa: E402
import model_transformer  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402


# --- tokenizer.py ---------------------------------------------------------------------

def gru_char_vocab_counts_lines():
    """The learner's CharTokenizer.train counts with counts.update(texts), one call on the whole list,
    instead of counts.update(text) for each text: a Counter updated with a list of strings counts the
    strings, not their characters, so the 'characters' ranked by frequency are whole sentences. Not one
    real character is in the vocabulary: every digit and every space encodes as <unk>, on both sides,
    and the model can only learn how many <unk> to write. A learner who changes the tokenizer bumps
    data.CACHE_VERSION, so cached splits are not reused."""
    @classmethod
    def train_(cls, texts, vocab_size):
        counts = Counter()
        counts.update(texts)                                            # BUG: for text in texts: counts.update(text)
        ranked = sorted(counts, key=lambda c: (-counts[c], c))
        return cls(ranked[: max(0, vocab_size - len(cls.SPECIALS))])
    tokenizer.CharTokenizer.train = train_
    data.CACHE_VERSION = "4-char-vocab-recount"


# --- model_transformer.py -------------------------------------------------------------

def cross_attention_reads_decoder():
    """The learner writes the decoder layer's cross-attention line by copying the self-attention line
    above it and renaming only the module: self.cross_attn.self_attention(h, causal=True, ...) instead
    of self.cross_attn.cross_attention(h, memory, src_mask, ...). The second attention attends to the
    decoder's own positions again; no decoder layer ever reads the encoder's output, so the decoder is
    a language model of the targets that never sees the source sentence (the encoder gets no gradient)."""
    def forward(self, y, memory, src_mask, cache=None):
        self_cache, cross_cache = (cache["self"], cache["cross"]) if cache is not None else (None, None)
        y = self.res_self(y, lambda h: self.self_attn.self_attention(h, causal=True, cache=self_cache))
        y = self.res_cross(y, lambda h: self.cross_attn.self_attention(h, causal=True, cache=cross_cache))  # BUG: cross_attention(h, memory, src_mask, cross_cache)
        return self.res_ff(y, self.ff)
    model_transformer.DecoderLayer.forward = forward


def layers_in_plain_list():
    """The learner keeps the encoder and decoder layers in plain Python lists instead of nn.ModuleList:
    the layers run in forward, but they are not registered as submodules, so model.parameters() (and
    with it the optimizer, the weight init of _init_weights, .to(device), the state dict) never sees
    them. Every attention and feed-forward weight stays at its random initial value; only the
    embeddings, the final LayerNorms and the output layer learn."""
    T = model_transformer
    def __init__(self, cfg, verbose=True):
        nn.Module.__init__(self)
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        self.cfg = cfg
        heads = lambda given, n: list(given) or [cfg.n_head] * n   # noqa: E731
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.d_model)
        self.src_embed = self.tgt_embed if cfg.share_src_tgt else nn.Embedding(cfg.src_vocab, cfg.d_model)
        self.register_buffer("positions", T.sinusoidal_positions(4096, cfg.d_model), persistent=False)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder = [T.EncoderLayer(cfg, h) for h in heads(cfg.enc_self_heads, cfg.n_enc_layer)]   # BUG: nn.ModuleList(...)
        self.decoder = [T.DecoderLayer(cfg, hs, hc) for hs, hc in zip(heads(cfg.dec_self_heads, cfg.n_dec_layer),
                                                                     heads(cfg.dec_cross_heads, cfg.n_dec_layer))]   # BUG: nn.ModuleList(...)
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.out_proj = nn.Linear(cfg.d_model, cfg.tgt_vocab, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_output:
            self.out_proj.weight = self.tgt_embed.weight
        if verbose:
            print(f"Transformer: {self.num_params() / 1e6:.2f}M parameters")
    T.Transformer.__init__ = __init__


# --- loss.py --------------------------------------------------------------------------

def gru_loss_backward_uses_log_probs():
    """The learner computes the loss from log_softmax (stable) and keeps those log-probabilities for
    backward, where it writes the gradient as 'softmax minus target' with the saved tensor: log p - q
    instead of p - q. The loss it reports is right; the gradient is not: log p is negative and largest
    in size for the least likely tokens, so every step pushes the unlikely tokens' logits up hardest
    and the model is driven towards a flat distribution instead of the targets."""
    @staticmethod
    def forward(ctx, logits, target, ignore_id, eps):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        V = x.shape[-1]
        keep = (target != ignore_id).to(x.dtype)
        t = target.clamp(0, V - 1)[:, None]
        logp = x.log_softmax(dim=-1)                                    # (N, V)
        row_loss = -(1 - eps) * logp.gather(1, t)[:, 0] - eps / V * logp.sum(dim=-1)
        ctx.save_for_backward(logp, t, keep)
        ctx.eps, ctx.dtype = eps, logits.dtype
        return (row_loss * keep).sum()

    @staticmethod
    @loss.once_differentiable
    def backward(ctx, grad_out):
        logp, t, keep = ctx.saved_tensors
        eps, V = ctx.eps, logp.shape[-1]
        grad = logp - eps / V                                           # BUG: logp.exp() - eps / V
        grad.scatter_add_(1, t, grad.new_full(t.shape, -(1 - eps)))
        grad.mul_((grad_out * keep)[:, None])
        return grad.to(ctx.dtype), None, None, None
    loss.SmoothedCrossEntropy.forward = forward
    loss.SmoothedCrossEntropy.backward = backward


# --- train.py -------------------------------------------------------------------------

def tgt_in_out_unpacked_swapped():
    """The learner unpacks collate's batch as src, tgt_out, tgt_in, the wrong order for (src, tgt_in,
    tgt_out): the decoder is fed <the target> + <eos> and taught to produce <bos> + <the target>, i.e.
    at each position the token it read one step before (and <bos> first). The loss falls fast, as
    copying the previous input is easy, while the validation loss, computed the right way round, stays
    high; in translation, started from <bos>, the model writes <bos> (which decode drops) and then
    nothing but the most frequent character, the space."""
    def train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty=None):
        smoothing = 0.0 if cfg["overfit_batches"] else cfg["label_smoothing"]
        n_tok = rt.mean(sum((b[2] != pad_id).sum() for b in micro_batches).to(rt.device, torch.float32))
        loss_sum = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro_batches):
            src, tgt_out, tgt_in = rt.to_device(*batch)                 # BUG: src, tgt_in, tgt_out
            with rt.amp:
                logits = model(src, tgt_in)
            loss_ = train.sequence_loss(logits, tgt_out, pad_id, smoothing) / n_tok
            loss_sum += loss_.detach()
            if penalty is not None and i == 0:
                loss_ = loss_ + penalty()
            rt.backward(loss_)
        return train.update(model, optimizer, loss_sum, n_tok, cfg, rt)
    train.train_step = train_step


def gru_lr_schedule_as_factor():
    """The learner treats the schedule's value as a factor of the peak, as torch's LambdaLR does with
    its lambda, and sets each group's rate to learning_rate * lr_at(...); but lr_at already returns the
    rate itself (3e-3 at the peak), so the optimizer steps at 3e-3 * 3e-3 = 9e-6 at best, 330 times
    less than the schedule the log shows."""
    def loop_step(model, optimizer, batches, run, epochs, cfg, rt, penalty=None):
        lr = train.lr_at(train.run_progress(run.step, epochs, run.time_progress, cfg), cfg)
        for group in optimizer.param_groups:
            group["lr"] = cfg["learning_rate"] * lr * group.get("lr_scale", 1.0)   # BUG: lr * group.get("lr_scale", 1.0)
        torch.manual_seed(hash((cfg["seed"], rt.rank, run.step)) % 2**63)
        micro_batches = []
        for _ in range(cfg["grad_accum"]):
            batch, run.epoch, run.batch_in_epoch = batches.next(run.epoch, run.batch_in_epoch)
            micro_batches.append(batch)
        pad_id = batches.data.tgt_tok.pad_id
        return lr, micro_batches, train.train_step(model, optimizer, micro_batches, pad_id, cfg, rt, penalty)
    train.loop_step = loop_step


def adam_eps_too_large():
    """The learner sets AdamW's eps to 0.1, following the advice in TensorFlow's Adam documentation
    (an epsilon of 1.0 or 0.1 for Inception on ImageNet), instead of the default 1e-8: eps is added to
    sqrt(v), the running size of each weight's gradient, which here is about 1e-3 to 1e-2, so each
    step is lr * g / 0.1 instead of lr * g / |g|, ten to a hundred times smaller, and smallest for the
    weights whose gradients are small."""
    def make_optimizer(model, cfg, lr_scale=None):
        return torch.optim.AdamW(train.param_groups(model, cfg, lr_scale), lr=cfg["learning_rate"],
                                 betas=(0.9, 0.98), eps=0.1, fused=True)   # BUG: eps=1e-8 (the default)
    train.make_optimizer = make_optimizer


# --- decoding.py ----------------------------------------------------------------------

def greedy_prefix_without_bos():
    """The learner's greedy loop, written without the model's cache, re-reads the whole prefix at each
    step, model.decode(prefix, memory)[:, -1], and builds the next prefix from the tokens output so far,
    torch.stack(out, dim=1), forgetting the <bos> in front: from the second step on the decoder reads
    the translation without its <bos>, every token one position earlier than in training."""
    @torch.no_grad()
    def greedy(model, src, bos_id, eos_id, pad_id, max_len):
        B = src.shape[0]
        memory = model.encode(src)
        prefix = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        limits = torch.as_tensor(max_len, device=src.device).expand(B)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        scores = torch.zeros(B, device=src.device)
        out = []
        for t in range(int(limits.max())):
            logits = model.decode(prefix, memory)[:, -1]                # (B, V)
            logp = logits.float().log_softmax(dim=-1)
            y = logp.argmax(dim=-1)
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = y.masked_fill(done, pad_id)
            out.append(y)
            prefix = torch.stack(out, dim=1)                            # BUG: torch.cat([prefix, y[:, None]], dim=1)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    decoding.greedy = greedy


def translate_strips_first_token():
    """The learner's translate drops the first token of every hypothesis, h[1:], to remove the <bos>
    it expects there; but greedy returns the hypotheses without <bos>, so the first real token of every
    translation is cut: with the character vocabulary, the first digit of each sentence."""
    @torch.no_grad()
    def translate_nbest(model, src_tok, tgt_tok, sentences, beam=1, alpha=0.6, nbest=1, batch_size=64,
                        max_src_len=256, max_len_a=1.5, max_len_b=10, device="cpu", amp=None, warn=print):
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
            src, limit = src.to(device), [decoding.max_target_len(len(encoded[i]) + 1, max_len_a, max_len_b) for i in idx]
            with decoding.precision(amp):
                if beam == 1:
                    hyps, scores = decoding.greedy(model, src, tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id, limit)
                    found = [[(decoding.strip_special(h[1:], tgt_tok.eos_id), s)]   # BUG: h (greedy's output has no <bos>)
                             for h, s in zip(hyps.tolist(), scores.tolist())]
                else:
                    found = decoding.beam_search(model, src, tgt_tok.bos_id, tgt_tok.eos_id, limit, beam, alpha, nbest)
            for b, i in enumerate(idx):
                out[i] = [(tgt_tok.decode(ids), s) for ids, s in found[b]]
        model.train(was_training)
        return out
    decoding.translate_nbest = translate_nbest

def gru_translate_encodes_word_by_word():
    """The learner's translate tokenizes each input word by word, [i for w in text.split() for i in
    src_tok.encode(w)] (the habit of word-level pipelines, where subwords are applied per word), while
    the training data were tokenized whole: the whitespace between the words is lost, and with the
    character vocabulary every source is its words run together, '1 5 2' read as '152', half the
    length of any source seen in training."""
    @torch.no_grad()
    def translate_nbest(model, src_tok, tgt_tok, sentences, beam=1, alpha=0.6, nbest=1, batch_size=64,
                        max_src_len=256, max_len_a=1.5, max_len_b=10, device="cpu", amp=None, warn=print):
        was_training = model.training
        model.eval()
        encoded = []
        for i, text in enumerate(sentences):
            ids = [t for w in text.split() for t in src_tok.encode(w)]  # BUG: src_tok.encode(text) if text.strip() else []
            if len(ids) > max_src_len:
                warn(f"warning: input line {i + 1} has {len(ids)} tokens; truncated to {max_src_len}")
                ids = ids[:max_src_len]
            encoded.append(ids)
        out = [[("", 0.0)] * nbest for _ in sentences]
        for idx, src in decoding.length_sorted_batches(encoded, src_tok.pad_id, src_tok.eos_id, batch_size):
            src, limit = src.to(device), [decoding.max_target_len(len(encoded[i]) + 1, max_len_a, max_len_b) for i in idx]
            with decoding.precision(amp):
                if beam == 1:
                    hyps, scores = decoding.greedy(model, src, tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id, limit)
                    found = [[(decoding.strip_special(h, tgt_tok.eos_id), s)] for h, s in zip(hyps.tolist(), scores.tolist())]
                else:
                    found = decoding.beam_search(model, src, tgt_tok.bos_id, tgt_tok.eos_id, limit, beam, alpha, nbest)
            for b, i in enumerate(idx):
                out[i] = [(tgt_tok.decode(ids), s) for ids, s in found[b]]
        model.train(was_training)
        return out
    decoding.translate_nbest = translate_nbest


# -----------------------------------------------------------------------------

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs (seed 1337): Transformer final training loss 0.971 (val loss 0.575), best BLEU 32.44 (length
# ratio 0.98); GRU: final training loss 1.107 (val loss 0.753), best BLEU 17.12 (length ratio 2.17)
GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")
# the clean runs (seed 1337): Transformer final training loss 0.971 (val loss 0.575), best BLEU 32.44 (length
# ratio 0.98); GRU: final training loss 1.107 (val loss 0.753), best BLEU 17.12 (length ratio 2.17)
HELD_OUT_8 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("cross_attention_reads_decoder",
     "loss 3.583 at step 1 against the clean run's 3.063, then stuck near 1.63 from step 100 on, 1.623 at step 300 "
     "against 0.971 (val loss 1.373 against 0.575); BLEU 0.8, 1.3 and 1.7 at steps 100, 200 and 300 against 6.2, "
     "22.3 and 32.4, length ratio 2.21 against 0.98: every sentence gets the same translation, cut at its length "
     "limit, '1 5 2 3 2 8' and '8 0 0 9 0 1' -> '2 5 7 8 0 2 3 2 0 7 7 7 3 3 ', '9 7 4 8' -> '2 5 7 8 0 2 3 2 0 7 7 '",
     cross_attention_reads_decoder, ()),
    ("layers_in_plain_list",
     "loss 3.362 at step 1 against the clean run's 3.063 and 3.134 at step 25 against 2.330, then flat near 1.58 "
     "from step 150 on, 1.574 at step 300 against 0.971 (val loss 1.304 against 0.575); BLEU 2.2, 4.1 and 3.8 at "
     "steps 100, 200 and 300 against 6.2, 22.3 and 32.4, length ratio 1.93 against 0.98: '1 5 2 3 2 8' -> "
     "'2 1 8 8 1 2 8 8 8 8 3 5 8', '9 7 4 8' -> '8 8 8 8 3 7 8 8 8 7 7 '",
     layers_in_plain_list, ()),
    ("tgt_in_out_unpacked_swapped",
     "loss below the clean run's from step 50 (1.333 against 1.579), 0.564 at step 300 against 0.971, while the val "
     "loss stays at 2.82-2.83 at steps 100, 200 and 300 against 1.058, 0.694 and 0.575; BLEU 0.1, 0.0 and 0.0 "
     "against 6.2, 22.3 and 32.4, length ratio 0.04 against 0.98: every translation a run of spaces, no digit",
     tgt_in_out_unpacked_swapped, ()),
    ("adam_eps_too_large",
     "loss 2.884 at step 25 against the clean run's 2.330, 1.749 at step 100 against 1.394, then flat near 1.60, "
     "1.598 at step 300 against 0.971 (val loss 1.332 against 0.575); BLEU 1.1, 1.7 and 2.4 at steps 100, 200 "
     "and 300 against 6.2, 22.3 and 32.4, length ratio 1.93 against 0.98: '1 5 2 3 2 8' -> '8 2 8 8 8 8 8 8 8 8', "
     "'8 0 0 9 0 1' -> '0 0 1 0 0 0 1'",
     adam_eps_too_large, ()),
    ("greedy_prefix_without_bos",
     "loss and val loss the clean run's to the digit (0.971, 0.575); BLEU 7.0, 10.0 and 8.0 at steps 100, 200 "
     "and 300 against 6.2, 22.3 and 32.4, length ratio 0.70 against 0.98: translations right for a digit or two, "
     "then cut short, '1 5 2 3 2 8' -> '8 2 3 2', '8 0 0 9 0 1' -> '1 0', '9 7 4 8' -> '8 7'",
     greedy_prefix_without_bos, ()),
    ("translate_strips_first_token",
     "loss and val loss the clean run's to the digit (0.971, 0.575); BLEU 6.3, 18.6 and 22.5 at steps 100, 200 "
     "and 300 against 6.2, 22.3 and 32.4, length ratio 0.85 against 0.98: every translation starts with a space "
     "and lacks its first digit, '8 0 0 9 0 1' -> ' 0 9 0 0 8' (ref '1 0 9 0 0 8'), '9 7 4 8' -> ' 4 7 9' "
     "(ref '8 4 7 9')",
     translate_strips_first_token, ()),
    ("gru_char_vocab_counts_lines",
     "loss 8.968 at step 1 against the clean GRU's 2.702 (ln V = ln 8000), 1.720 at step 50, then flat near 1.43, "
     "1.430 at step 300 against 1.107, while the val loss is far below the clean one, 0.349, 0.343 and 0.335 at "
     "steps 100, 200 and 300 against 1.199, 0.861 and 0.753; BLEU 0.0 at every evaluation against 17.1, length "
     "ratio 0.14: every translation a string of <unk> marks, '\u2047\u2047\u2047...', no digit or space",
     gru_char_vocab_counts_lines, GRU),
    ("gru_loss_backward_uses_log_probs",
     "loss 2.702 at step 1 (the clean GRU's), then rising a little and flat, 2.818 at step 50 and 2.796 at step 300 "
     "against 1.107 (val loss 2.792-2.794 against 0.753); BLEU 0.0 at every evaluation against 17.1, length ratio "
     "0.14: every translation one digit repeated without spaces, '3333333333333333333333333333'",
     gru_loss_backward_uses_log_probs, GRU),
    ("gru_lr_schedule_as_factor",
     "the logged learning rate the clean GRU's (peak 2.96e-3 at step 50); loss 2.702 at step 1, then hardly moving, "
     "2.651 at step 100 and 2.587 at step 300 against 1.541 and 1.107 (val loss 2.573 against 0.753); BLEU 0.0 at "
     "every evaluation against 17.1, length ratio 0.00: every translation only spaces",
     gru_lr_schedule_as_factor, GRU),
    ("gru_translate_encodes_word_by_word",
     "loss and val loss the clean GRU's to the digit (1.107, 0.753); BLEU 2.3, 5.4 and 6.5 at steps 100, 200 and 300 "
     "against 2.0, 9.0 and 17.1, length ratio 0.85 against 2.17: translations short and wrong, '1 5 2 3 2 8' -> "
     "'2 2 2', '9 7 4 8' -> '4 9 7 9 7', '8 0 0 9 0 1' -> '1 0 0 8 0 8 0 8 0 0 '",
     gru_translate_encodes_word_by_word, GRU),
]
