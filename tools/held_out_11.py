"""
Held-out set 11 of learner bugs for tools/bugs.py's toy runs (the tiny Transformer, or the GRU with
dot attention: GRU below), written apart from diagnostics.py, after sets 3 to 10. Each is put in from
outside (monkeypatching, only in the process that runs train.main); the line with the learner's
mistake is marked # BUG. No library file is edited.

    python tools/bugs.py --bugs=clean,NAME     # any names of HELD_OUT_11
"""

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

import decoding  # noqa: E402
import loss  # noqa: E402
import model_rnn  # noqa: E402
import model_transformer  # noqa: E402
import train  # noqa: E402

GRU = ("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--attention=dot")


# --- model_transformer.py -------------------------------------------------------------

def positions_exponent_not_divided():
    """The learner writes the sinusoid's frequencies as exp(2i * -log(10000)), forgetting the / d of
    the exponent 2i/d: the first pair of dimensions turns at 1 radian per position, as it should, but
    every other frequency is 10000^(-2i) = 1e-8 or less, so those dimensions are the constants sin(0) = 0
    and cos(0) = 1 at every position. The whole position code is one circle of period 2 pi: positions 0,
    6, 13, 19 look alike, and the model cannot tell which digit of a 12-digit sentence is which."""
    def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -math.log(10000.0))   # BUG: (-math.log(10000.0) / d)
        table = torch.zeros(n, d)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        return table
    model_transformer.sinusoidal_positions = sinusoidal_positions


def qkv_split_interleaved():
    """The learner's fused q/k/v product is split with .view(B, L, -1, 3).unbind(-1), nanoGPT's
    (B, T, 3, ...) layout written the wrong way round, instead of .chunk(3, dim=-1): each of q, k and v
    takes every third column of the stacked output, a mix of the three projections. Training (the
    fused path) learns with that mix and its loss is fine, but cached decoding, one position at a time,
    projects with q_proj, k_proj and v_proj separately, as written: at translation the decoder's
    self-attention gets queries, keys and values unlike any it was trained with."""
    def project(self, x: torch.Tensor, projections: tuple) -> list:
        if x.shape[1] == 1:
            return [self.split_heads(proj(x)) for proj in projections]
        weight = torch.cat([proj.weight for proj in projections])
        bias = torch.cat([proj.bias for proj in projections])
        B, L, _ = x.shape
        return [self.split_heads(t) for t in F.linear(x, weight, bias).view(B, L, -1, len(projections)).unbind(-1)]   # BUG: .chunk(len(projections), dim=-1)
    model_transformer.MultiHeadAttention.project = project


def decode_value_cache_from_keys():
    """The learner's self-attention cache copies the keys' line for the values and renames only the
    new tensor: v = torch.cat([cache["k"], v]) instead of cache["v"]. Training never uses the cache, so
    its loss is untouched; in cached decoding, from the second step on, every earlier position's value
    is its key vector, and the decoder reads garbage from everything it has written so far."""
    def self_attention(self, x: torch.Tensor, mask=None, causal: bool = False, cache=None) -> torch.Tensor:
        q, k, v = self.project(x, (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["k"], v], dim=2)   # BUG: torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            causal = False
        return self.attend(q, k, v, mask, causal)
    model_transformer.MultiHeadAttention.self_attention = self_attention


def decoder_self_attention_dropped():
    """The learner's decoder layer calls its self-attention sub-layer without assigning the result,
    self.res_self(y, ...) instead of y = self.res_self(y, ...): it runs, and is thrown away. No decoder
    position ever sees the others; each predicts from its own input token, its position and the source,
    so it does not know what it has written (in the character-level toy, which digit comes after a
    space), and translations repeat a digit."""
    def forward(self, y: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, cache=None) -> torch.Tensor:
        self_cache, cross_cache = (cache["self"], cache["cross"]) if cache is not None else (None, None)
        self.res_self(y, lambda h: self.self_attn.self_attention(h, causal=True, cache=self_cache))   # BUG: y = self.res_self(...)
        y = self.res_cross(y, lambda h: self.cross_attn.cross_attention(h, memory, src_mask, cross_cache))
        return self.res_ff(y, self.ff)
    model_transformer.DecoderLayer.forward = forward


# --- loss.py --------------------------------------------------------------------------

def loss_grad_eps_not_divided():
    """The learner's hand-written backward of the label-smoothed cross-entropy subtracts the whole
    smoothing mass from every logit, p - eps, instead of its share eps / V: the forward still reports
    the right loss, but the gradient pushes every wrong token's logit up by eps - eps / V on top of
    p - q, and the true token's by the same. Under Adam this uniform push, rescaled weight by weight, is
    no longer harmless; the model learns little beyond which characters are common."""
    def backward(ctx, grad_out: torch.Tensor):
        p, t, keep = ctx.saved_tensors
        eps, V = ctx.eps, p.shape[-1]
        grad = p - eps                                                  # BUG: p - eps / V
        grad.scatter_add_(1, t, grad.new_full(t.shape, -(1 - eps)))
        grad.mul_((grad_out * keep)[:, None])
        return grad.to(ctx.dtype), None, None, None
    loss.SmoothedCrossEntropy.backward = staticmethod(once_differentiable(backward))


# --- decoding.py ----------------------------------------------------------------------

def greedy_where_args_swapped():
    """The learner pads finished sentences with torch.where(done, y, pad_id), meaning 'pad where done',
    but torch.where(cond, a, b) takes a where cond holds: every sentence still being decoded gets <pad>
    as its token (and as the next step's input), and only a finished one keeps its argmax. No live
    sentence can ever produce <eos>, each runs to its length limit writing <pad>, and every translation
    comes out empty; the teacher-forced loss is untouched."""
    @torch.no_grad()
    def greedy(model, src: torch.Tensor, bos_id: int, eos_id: int, pad_id: int, max_len) -> tuple:
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
            y = logp.argmax(dim=-1)
            scores += logp.gather(1, y[:, None])[:, 0].masked_fill(done, 0.0)
            y = torch.where(done, y, pad_id)                            # BUG: y.masked_fill(done, pad_id)
            out.append(y)
            done |= (y == eos_id) | (t + 1 >= limits)
            if done.all():
                break
        return torch.stack(out, dim=1), scores
    decoding.greedy = greedy


# --- model_rnn.py ---------------------------------------------------------------------

def gru_pack_lengths_sorted_alone():
    """The learner calls pack_padded_sequence with its default enforce_sorted=True, gets 'lengths
    array must be sorted in decreasing order', and sorts the lengths, lengths.sort(descending=True),
    but not the rows of the batch: row b is packed with the b-th largest length, not its own. Training
    batches hold sentences of nearly one length, so little changes there; translation batches the
    validation sentences shortest first, so the shortest sentences are read far past their <eos> into
    padding and the longest are cut after a few tokens (their final state and attention keys with them)."""
    def encode(self, src: torch.Tensor) -> model_rnn.Memory:
        src_mask = src != self.cfg.pad_id
        lengths = src_mask.sum(dim=1).sort(descending=True).values      # BUG: src_mask.sum(dim=1) (and enforce_sorted=False)
        x = self.dropout(self.embed(self.src_embed, src))
        packed = model_rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True)
        out, h_n = self.encoder(packed)
        out, _ = model_rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        summary = h_n[-1]
        init = torch.tanh(self.enc_bridge(summary)).view(src.shape[0], self.cfg.n_dec_layer, -1)
        keys = self.dec_key_proj(out) if self.cfg.attention != "none" else None
        return model_rnn.Memory(out, keys, src_mask, init, summary)
    model_rnn.Seq2SeqRNN.encode = encode


def gru_decode_step_runs_encoder_gru():
    """The learner writes the one-step decoder for translation out by hand (the GRU, then Luong
    attention, then the readout), copying the GRU call from encode: self.encoder(...) instead of
    self.decoder(...). The two GRUs have the same input width, so it runs; training (run_decoder) uses
    the decoder GRU and its loss is fine, but every translation is written by the source-reading GRU,
    whose states mean nothing to the attention and readout trained on the decoder's."""
    def decode_step(self, y: torch.Tensor, memory: model_rnn.Memory, cache) -> tuple:
        hidden = memory.init if cache is None else cache["hidden"]
        h0 = hidden.transpose(0, 1).contiguous()
        states, h_n = self.encoder(self.embed(self.tgt_embed, y[:, None]), h0)   # BUG: self.decoder(...)
        context = self.attend(states, memory)
        logits = self.readout(states, context)
        return logits[:, 0], {"hidden": h_n.transpose(0, 1)}
    model_rnn.Seq2SeqRNN.decode_step = decode_step


# --- train.py -------------------------------------------------------------------------

def gru_weight_decay_divided_by_lr():
    """The learner has read that AdamW multiplies the weight decay by the learning rate and 'undoes'
    it, weight_decay / learning_rate (0.01 / 3e-3 = 3.3): at the peak each step shrinks every weight
    matrix by 1%, far more than the GRU's small updates can make up for. The embeddings, GRU weights and
    output layer are held near zero; the model learns the most frequent digit and little else."""
    def param_groups(model, cfg: dict, lr_scale: dict | None = None) -> list:
        groups = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = next((m for suffix, m in (lr_scale or {}).items() if name.endswith(suffix)), 1.0)
                groups.setdefault((p.dim() >= 2, scale), []).append(p)
        decay = cfg["weight_decay"] / cfg["learning_rate"]              # BUG: cfg["weight_decay"]
        return [{"params": ps, "weight_decay": decay if decays else 0.0, "lr_scale": scale}
                for (decays, scale), ps in groups.items()]
    train.param_groups = param_groups


def gru_optimizer_of_discarded_model():
    """The learner's main() builds the model and its optimizer, then seeds the weights
    (torch.manual_seed) and builds the model a second time 'so the initialisation is seeded', and
    trains that one with the optimizer it already has: the optimizer holds the first model's
    parameters. The trained model's gradients are computed but never applied (nor zeroed: they pile up,
    the gradient norm grows), its weights stay at their random start: the loss stays at ln V."""
    def main(argv: list | None = None):
        cfg = dict(train.DEFAULTS)
        here = ROOT
        given = train.configure(cfg, argv, doc_files=(train.__file__, os.path.join(here, "data.py"),
                                                      os.path.join(here, "model_rnn.py")))
        resume = train.load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt")) if cfg["init_from"] == "resume" else None
        if resume is not None:
            cfg = train.resumed_config(train.DEFAULTS, given, resume, cfg["out_dir"])
        if bad := [k for k in train.POSITIVE if cfg[k] <= 0]:
            raise train.ConfigError(f"{bad[0]}={cfg[bad[0]]} must be positive (python train.py -h shows its default)")
        rt = train.setup(cfg["device"], cfg["dtype"])
        source = resume if resume is not None or cfg["init_from"] == "scratch" else train.load_checkpoint(cfg["init_from"])
        if rt.master:
            train.claim_run_dir(cfg["out_dir"], new_run=resume is None, overwrite=cfg["overwrite"],
                                hint="continue it with --init_from=resume, ", start="" if source is None else cfg["init_from"])
        tokenizers = train.pair_from_state(source["tokenizers"]) if source is not None else None
        with rt.master_first():
            data = train.load_data(train.DataConfig.of(cfg), verbose=rt.master, tokenizers=tokenizers)
        model = train.build_model(cfg, data.src_tok, data.tgt_tok, verbose=rt.master) if source is None \
            else train.model_from_checkpoint(source, verbose=rt.master)[0]
        optimizer = train.make_optimizer(model, cfg)
        if cfg["overfit_batches"]:
            cfg["dropout"] = 0.0
            source = source and {**source, "model_config": {k: 0.0 if "dropout" in k else v
                                                            for k, v in source["model_config"].items()}}
        torch.manual_seed(cfg["seed"])
        model = train.build_model(cfg, data.src_tok, data.tgt_tok, verbose=rt.master) if source is None \
            else train.model_from_checkpoint(source, verbose=rt.master)[0]   # BUG: one model, seeded, then make_optimizer(model, cfg)
        if rt.master:
            print(rt)
        model.to(rt.device)
        try:
            run = train.train_loop(model, optimizer, data, cfg, rt, resume)
        except train.Diverged as reason:
            if rt.master:
                print(f"stopping: {reason}")
            rt.shutdown()
            sys.exit(1)
        if rt.master:
            plots = f"; plots in {train.plot_log(cfg['out_dir'])}" if cfg["plot"] else ""
            print(f"done: {run.step} steps, {run.minutes:.1f} min, best validation BLEU {run.best_bleu:.2f}{plots}")
        rt.shutdown()
        return run
    train.main = main


# the clean runs: Transformer final training loss 0.970 (val loss 0.574), BLEU 6.2, 23.2, 32.6 at steps 100, 200,
# 300; GRU: final training loss 1.094 (val loss 0.733), BLEU 2.5, 10.9, 16.1.
# Tried and dropped as about as good as the clean run (BLEU at step 300) or worse than it only by a little: the heads
# split with view(B, L, Dh, H), 16 heads of width 2 (34.4); the attention scores divided by Dh instead of sqrt(Dh)
# (39.2); the translation limit of the batch's first (shortest) sentence for all (32.4); the warm-up share read as
# 1 - warmup_frac (36.1; GRU 17.9); the encoder's self-attention causal (51.5); cross-attention keys from q_proj
# (54.2); weight decay / lr on the Transformer (33.5); optimizer.step() called twice per update (60.4); decoder
# layers not chained, each reading the embeddings (27.6, val loss 0.657); cos replaced by sin in the positions
# (37.8); the Residual's pre_norm flag inverted, post-LN (33.6); training batches cut from the validation split's
# lengths (34.3; GRU 76.1); GRU: the encoder not packed (14.4), packed lengths without the <eos> (36.2), the
# optimizer without the 1-D parameters (14.8), attention values from the keys (43.7), the schedule's rate set on
# optimizer.defaults, a constant 3e-3 (62.0), the readout without its tanh (59.6). Crashed, dropped: greedy's
# hypotheses stacked time-major, torch.stack(out) (IndexError in translate).
HELD_OUT_11 = [  # (name, what a learner sees in the run: loss and BLEU against the clean run's, inject, knobs)
    ("positions_exponent_not_divided",
     "loss 1.213 at step 300 against the clean run's 0.970, val loss 1.064, 0.921 and 0.862 at steps 100, 200 and "
     "300 against 1.058, 0.694 and 0.574; BLEU 6.0, 11.3 and 12.3 against 6.2, 23.2 and 32.6, length ratio 1.14: "
     "the right digits in a wrong order, '1 5 2 3 2 8' -> '2 8 5 2 3 1', '8 0 0 9 0 1' -> '0 0 1 8 9'",
     positions_exponent_not_divided, ()),
    ("qkv_split_interleaved",
     "loss 0.825 at step 300, below the clean run's 0.970, and val loss 0.385 against 0.574, but BLEU 1.7, 5.5 and "
     "4.4 at steps 100, 200 and 300 against 6.2, 23.2 and 32.6, length ratio 0.84: translations cut short or empty, "
     "'1 5 2 3 2 8' -> ' 3 8', '8 0 0 9 0 1' -> '', '9 7 4 8' -> '8'",
     qkv_split_interleaved, ()),
    ("decode_value_cache_from_keys",
     "loss and val loss exactly the clean run's (0.970; 1.058, 0.694, 0.574) but BLEU 3.0, 3.4 and 3.3 at steps "
     "100, 200 and 300 against 6.2, 23.2 and 32.6, length ratio 0.79: the first digit right, then wrong and short, "
     "'1 5 2 3 2 8' -> '8 3 3', '8 0 0 9 0 1' -> '1 0', '9 7 4 8' -> '8 3'",
     decode_value_cache_from_keys, ()),
    ("decoder_self_attention_dropped",
     "loss 1.156 at step 300 against the clean run's 0.970, val loss 1.045, 0.922 and 0.786 against 1.058, 0.694 "
     "and 0.574; BLEU 4.1, 5.0 and 9.4 at steps 100, 200 and 300 against 6.2, 23.2 and 32.6: digits repeated, "
     "'1 5 2 3 2 8' -> '8 8 2 2 2 2', '8 0 0 9 0 1' -> '0 0 0 0 0 0', '9 7 4 8' -> '8 8 4 9'",
     decoder_self_attention_dropped, ()),
    ("loss_grad_eps_not_divided",
     "loss 1.97-2.03 from step 100 to 300 against the clean run's 1.394 and 0.970, the gradient norm 4.7-6.9 against "
     "0.9-1.5; val loss 1.854, 1.881 and 1.881 against 1.058, 0.694 and 0.574; BLEU 0.8, 1.1 and 1.0 against 6.2, "
     "23.2 and 32.6: a few frequent digits and runs of spaces, '1 5 2 3 2 8' -> '8 8 3 8 6 3 8 6 3 8 3 3 8 8 ', "
     "'9 7 4 8' -> '  8 8 8    8 8        '",
     loss_grad_eps_not_divided, ()),
    ("greedy_where_args_swapped",
     "loss and val loss exactly the clean run's (0.970; 1.058, 0.694, 0.574) but BLEU 0.00 at steps 100, 200 and "
     "300 against 6.2, 23.2 and 32.6, length ratio 0.01-0.09: every translation empty, '1 5 2 3 2 8' -> '', "
     "'8 0 0 9 0 1' -> '', '9 7 4 8' -> ''",
     greedy_where_args_swapped, ()),
    ("gru_pack_lengths_sorted_alone",
     "loss 1.119 at step 300 against the clean GRU's 1.094, val loss 1.223, 0.909 and 0.792 at steps 100, 200 and "
     "300 against 1.214, 0.858 and 0.733; BLEU 1.6, 7.3 and 7.6 against 2.5, 10.9 and 16.1, length ratio 2.21: one "
     "or two digits right, then a digit repeated, '1 5 2 3 2 8' -> '8 3 2 2 2 1 2 2 2 2 2 2 2 2 ', '9 7 4 8' -> "
     "'9 9 7 9 9 9 9 9 9 9 9 '",
     gru_pack_lengths_sorted_alone, GRU),
    ("gru_decode_step_runs_encoder_gru",
     "loss and val loss exactly the clean GRU's (1.094; 1.214, 0.858, 0.733) but BLEU 0.70, 0.36 and 0.25 at steps "
     "100, 200 and 300 against 2.5, 10.9 and 16.1, length ratio 0.37: the spaces gone, a digit repeated to the "
     "limit, '1 5 2 3 2 8' -> '2225555555555555555555555555', '8 0 0 9 0 1' -> '1088000000000000000000000000'",
     gru_decode_step_runs_encoder_gru, GRU),
    ("gru_weight_decay_divided_by_lr",
     "loss 1.541 at step 300 against the clean GRU's 1.094, val loss 1.399, 1.339 and 1.289 at steps 100, 200 and "
     "300 against 1.214, 0.858 and 0.733; BLEU 0.33, 0.38 and 0.85 against 2.5, 10.9 and 16.1: one digit repeated, "
     "'1 5 2 3 2 8' -> '2 2 2 2 2 2 2 2', '8 0 0 9 0 1' -> '0 9 9 9 9 9 9 9 9', '9 7 4 8' -> '9 9 9 9 9 9 9'",
     gru_weight_decay_divided_by_lr, GRU),
    ("gru_optimizer_of_discarded_model",
     "loss 2.702 (ln V = 2.708) from step 1 to 300 against the clean GRU's 1.094, the gradient norm growing from "
     "0.46 to 1.3-1.5; val loss 2.702 at every evaluation against 1.214, 0.858 and 0.733; BLEU 0.00 against 2.5, "
     "10.9 and 16.1, length ratio 0.14: the same random characters at every evaluation, '1 5 2 3 2 8' -> "
     "'5455745547554754575457545754', '9 7 4 8' -> '4554754754574575457457'",
     gru_optimizer_of_discarded_model, GRU),
]
