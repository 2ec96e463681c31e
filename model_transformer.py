"""
The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017), written
out so every step is visible: embeddings scaled by sqrt(D), sinusoidal positions, multi-head
attention with explicit q/k/v projections, padding and causal masks, feed-forward blocks,
residuals with pre-LN (default) or post-LN (the paper's) placement, tied embeddings.

Interface shared with model_rnn.py (train.py, decoding.py and prune.py rely on nothing else):
    logits = model(src, tgt_in)                          # (B, T, V) teacher-forced training
    memory = model.encode(src)                           # anything whose tensors are batch-first
    logits = model.decode(tgt_in, memory)                # (B, T, V) for a given encoder memory
                                                         # (last_only=True: (B, 1, V), the last position)
    logits, cache = model.decode_step(y, memory, cache)  # one target step, cache=None at start
    maps = model.attention_maps(src, tgt_in)             # {panel title: (B, T, S)} for plots
    weights = model.attention_weights(src, tgt_in)       # (Transformer only) every head of every type
Each attention module has a `head_gate` slot: a module returning one multiplier per head,
applied to the head outputs before out_proj (none = all ones), where gates.attach_gates puts L0
gates; a module may hold any number of heads (zero included) after pruning.
Leaves out: relative positions, mixture-of-experts, flash kernels. Beam search: decoding.py.
"""

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    src_vocab: int
    tgt_vocab: int
    pad_id: int                       # padding id of the source vocabulary (builds the source mask)
    d_model: int = 256                # D: model width
    n_head: int = 4                   # H: heads per attention module (unless pruned)
    n_enc_layer: int = 3
    n_dec_layer: int = 3
    d_ff: int = 1024                  # feed-forward hidden width
    dropout: float = 0.1              # on embeddings and sub-layer outputs (before the residual sum)
    attn_dropout: float = 0.1         # on attention weights (fairseq's attention_dropout, default 0)
    ff_dropout: float = 0.1           # on the feed-forward hidden layer (fairseq's activation_dropout, default 0)
    pre_norm: bool = True             # LayerNorm before each sub-layer (stable); False = the paper's post-LN
    tie_output: bool = True           # target embedding doubles as the output projection
    share_src_tgt: bool = False       # source and target share one embedding (needs a joint vocabulary)
    attn_impl: str = "auto"           # 'sdpa' (F.scaled_dot_product_attention), 'math' (explicit softmax), 'auto':
                                      # math on a CPU (there SDPA's fused backward was slower), sdpa elsewhere
    # heads kept per layer after pruning; empty = n_head everywhere
    enc_self_heads: list[int] = field(default_factory=list)
    dec_self_heads: list[int] = field(default_factory=list)
    dec_cross_heads: list[int] = field(default_factory=list)


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """(n, d) table: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p, scale the others by 1 / (1 - p).

    F.dropout's semantics (p rounded to a multiple of 1/65536), ~3x cheaper on a CPU, where one
    random number per element is a large share of a step (docs/performance.md): one 64-bit random
    number serves four elements, read as four 16-bit integers; an element is dropped when its
    integer is among the lowest p * 65536. On a GPU F.dropout is one fused kernel and is used."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    k = round(p * 65536)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= k - 32768     # int16 spans -32768..32767
    return x * (keep.to(x.dtype) * (65536 / (65536 - k)))


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(Dh)) V for H heads in parallel, then out_proj."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, dropout: float):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = n_head, head_dim, dropout
        with warnings.catch_warnings():   # n_head = 0 (pruned away) makes empty weights: nothing to initialise
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.q_proj = nn.Linear(d_model, n_head * head_dim)
            self.k_proj = nn.Linear(d_model, n_head * head_dim)
            self.v_proj = nn.Linear(d_model, n_head * head_dim)
            self.out_proj = nn.Linear(n_head * head_dim, d_model)
        for p in self.parameters():       # empty after pruning: nothing to learn (DDP would wait for their gradients)
            p.requires_grad_(p.numel() > 0)
        self.head_gate: nn.Module | None = None   # returns (H,) multipliers; prune.py sets it
        self.impl = "auto"
        self.last_weights: torch.Tensor | None = None  # (B, H, T, S) when record_weights is on
        self.record_weights = False

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_head, self.head_dim).transpose(1, 2)   # (B, L, H*Dh) -> (B, H, L, Dh)

    def project(self, x: torch.Tensor, names: str) -> list[torch.Tensor]:
        """The named projections of one input ('qkv' or 'kv'), split into heads, as one matrix product
        with the weights stacked: one pass over x (and one bf16 cast of it) instead of three."""
        layers = [getattr(self, f"{name}_proj") for name in names]
        if x.shape[1] == 1:       # one cached decoding step: stacking the weights each step costs more than it saves
            return [self.split_heads(layer(x)) for layer in layers]
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        return [self.split_heads(t) for t in F.linear(x, weight, bias).chunk(len(names), dim=-1)]

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None, mask: torch.Tensor | None = None,
                causal: bool = False, cache: dict | None = None, cache_kind: str = "") -> torch.Tensor:
        """x: (B, T, D) queries; kv: (B, S, D) keys/values source (None with a filled cache).

        mask: (B, 1, 1, S) bool, True where a key may be attended (padding -> False).
        causal: query t sees keys 0..t only. cache: dict for incremental decoding; with
        cache_kind='self' new keys/values are appended to it, with 'cross' they are computed
        once from the encoder output and reused at every step.
        """
        B, T, D = x.shape
        if self.n_head == 0:          # every head pruned away: only the output bias is left
            return self.out_proj.bias.expand(B, T, D)
        if cache is None and kv is x:                                   # self-attention
            q, k, v = self.project(x, "qkv")                              # (B, H, T, Dh) each
        elif cache is None:                                               # cross-attention
            q, (k, v) = self.split_heads(self.q_proj(x)), self.project(kv, "kv")   # k, v: (B, H, S, Dh)
        elif cache_kind == "cross":
            q = self.split_heads(self.q_proj(x))
            if "k" not in cache:
                cache["k"], cache["v"] = self.project(kv, "kv")
            k, v = cache["k"], cache["v"]
        else:                         # self-attention while decoding: append this step's keys/values
            q, k_new, v_new = self.project(x, "qkv")
            k = k_new if "k" not in cache else torch.cat([cache["k"], k_new], dim=2)
            v = v_new if "v" not in cache else torch.cat([cache["v"], v_new], dim=2)
            cache["k"], cache["v"] = k, v
            causal = False            # the cache only holds the past: nothing to hide
        p_drop = self.dropout if self.training else 0.0
        impl = self.impl if self.impl != "auto" else ("math" if x.device.type == "cpu" else "sdpa")
        if impl == "sdpa" and not self.record_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop, is_causal=causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)   # (B, H, T, S)
            if causal:
                S = k.shape[2]
                future = torch.ones(T, S, dtype=torch.bool, device=x.device).triu(S - T + 1)
                scores = scores.masked_fill(future, float("-inf"))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)                             # (B, H, T, S), rows sum to 1
            if self.record_weights:
                self.last_weights = weights.detach()
            out = dropout(weights, p_drop, self.training) @ v             # (B, H, T, Dh)
        if self.head_gate is not None:
            out = out * self.head_gate().to(out.dtype).view(1, -1, 1, 1)  # one multiplier per head
        out = out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*Dh)
        return self.out_proj(out)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.relu(self.up(x))))


class Residual(nn.Module):
    """x + dropout(f(norm(x))) with pre-LN, or norm(x + dropout(f(x))) with post-LN.

    f_ignores_input: f is an attention whose heads were all pruned (it returns its output bias),
    so with pre-LN the norm gets no gradient; it is frozen (DDP would wait for its gradients)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool, f_ignores_input: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.norm.requires_grad_(not (pre_norm and f_ignores_input))
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, n_self: int):
        super().__init__()
        Dh = cfg.d_model // cfg.n_head
        self.self_attn = MultiHeadAttention(cfg.d_model, n_self, Dh, cfg.attn_dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.ff_dropout)
        self.res_attn = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm, f_ignores_input=n_self == 0)
        self.res_ff = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.res_attn(x, lambda h: self.self_attn(h, h, src_mask))
        return self.res_ff(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, n_self: int, n_cross: int):
        super().__init__()
        Dh = cfg.d_model // cfg.n_head
        self.self_attn = MultiHeadAttention(cfg.d_model, n_self, Dh, cfg.attn_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, n_cross, Dh, cfg.attn_dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.ff_dropout)
        self.res_self = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm, f_ignores_input=n_self == 0)
        self.res_cross = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm, f_ignores_input=n_cross == 0)
        self.res_ff = Residual(cfg.d_model, cfg.dropout, cfg.pre_norm)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
                cache: dict | None = None) -> torch.Tensor:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        y = self.res_self(y, lambda h: self.self_attn(h, h, causal=True, cache=self_cache, cache_kind="self"))
        y = self.res_cross(y, lambda h: self.cross_attn(h, memory, src_mask, cache=cross_cache,
                                                        cache_kind="cross"))
        return self.res_ff(y, self.ff)


class Transformer(nn.Module):
    kind = "transformer"

    def __init__(self, cfg: TransformerConfig, verbose: bool = True):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        if cfg.share_src_tgt and cfg.src_vocab != cfg.tgt_vocab:
            raise ValueError("share_src_tgt needs one joint vocabulary (joint_vocab=True)")
        self.cfg = cfg
        heads = lambda given, n: list(given) or [cfg.n_head] * n   # noqa: E731
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.d_model)
        self.src_embed = self.tgt_embed if cfg.share_src_tgt else nn.Embedding(cfg.src_vocab, cfg.d_model)
        self.register_buffer("positions", sinusoidal_positions(4096, cfg.d_model), persistent=False)
        self.embed_dropout = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, h) for h in heads(cfg.enc_self_heads, cfg.n_enc_layer))
        self.decoder = nn.ModuleList(
            DecoderLayer(cfg, hs, hc) for hs, hc in zip(heads(cfg.dec_self_heads, cfg.n_dec_layer),
                                                       heads(cfg.dec_cross_heads, cfg.n_dec_layer)))
        # pre-LN leaves the residual stream un-normalised, so each stack ends with a LayerNorm
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.out_proj = nn.Linear(cfg.d_model, cfg.tgt_vocab, bias=False)
        self.set_attention_impl(cfg.attn_impl)
        self.apply(self._init_weights)
        if cfg.tie_output:
            self.out_proj.weight = self.tgt_embed.weight
        if verbose:
            print(f"Transformer: {self.num_params() / 1e6:.2f}M parameters")

    def _init_weights(self, module: nn.Module) -> None:
        # Embeddings ~ N(0, D^-1/2): times sqrt(D) they enter at unit scale, and as the (tied)
        # output projection they give logits of about unit variance, so the loss at step 0 is
        # close to ln V (uniform guessing) instead of far above it.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.d_model ** -0.5)
        elif isinstance(module, nn.Linear) and module.weight.numel() > 0:   # (a pruned-away attention is empty)
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_modules(self) -> dict[str, list[MultiHeadAttention]]:
        """The attention modules by type, layer order: 'enc' (encoder self), 'dec' (decoder self), 'cross'."""
        return {"enc": [layer.self_attn for layer in self.encoder],
                "dec": [layer.self_attn for layer in self.decoder],
                "cross": [layer.cross_attn for layer in self.decoder]}

    @torch.no_grad()
    def attention_weights(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every head's attention while reading tgt_in with teacher forcing: {'enc': [(B, H, S, S)
        per layer], 'dec': [(B, H, T, T)], 'cross': [(B, H, T, S)]}, queries by keys; padded keys get
        0. A module whose heads were all pruned gives a (B, 0, ., .) tensor."""
        modules = self.attention_modules()
        for layers in modules.values():
            for m in layers:
                m.record_weights, m.last_weights = True, None
        B, S, T = src.shape[0], src.shape[1], tgt_in.shape[1]
        shape = {"enc": (S, S), "dec": (T, T), "cross": (T, S)}
        try:
            self(src, tgt_in)
            return {kind: [m.last_weights if m.n_head else src.new_zeros((B, 0, *shape[kind]), dtype=torch.float)
                           for m in layers] for kind, layers in modules.items()}
        finally:
            for layers in modules.values():
                for m in layers:
                    m.record_weights, m.last_weights = False, None    # no batch is kept in memory

    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-attention weights while reading tgt_in, one (B, T, S) map per decoder layer and
        head: {'layer 1 head 1': ..., ...}; a layer whose heads were all pruned has none."""
        return {f"layer {i + 1} head {h + 1}": w[:, h]
                for i, w in enumerate(self.attention_weights(src, tgt_in)["cross"]) for h in range(w.shape[1])}

    def set_attention_impl(self, impl: str) -> None:
        if impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl='{impl}' is not known: use 'auto', 'sdpa' or 'math'")
        for modules in self.attention_modules().values():
            for m in modules:
                m.impl = impl

    def embed(self, table: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = table(ids) * math.sqrt(self.cfg.d_model)                     # (B, L, D)
        return self.embed_dropout(x + self.positions[start:start + ids.shape[1]])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory: (encoder output (B, S, D), key mask (B, 1, 1, S), True = real token)."""
        src_mask = (src != self.cfg.pad_id)[:, None, None, :]
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def decode(self, tgt_in: torch.Tensor, memory: tuple, cache: dict | None = None,
               last_only: bool = False) -> torch.Tensor:
        """tgt_in (B, T) -> logits (B, T, V); with a cache, tgt_in holds only the new positions;
        last_only: logits of the last position only, (B, 1, V)."""
        enc_out, src_mask = memory
        start = cache.get("length", 0) if cache is not None else 0
        y = self.embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder):
            y = layer(y, enc_out, src_mask, None if cache is None else cache.setdefault(i, {}))
        if cache is not None:
            cache["length"] = start + tgt_in.shape[1]
        if last_only:
            y = y[:, -1:]
        return self.out_proj(self.dec_norm(y))                            # (B, T, V)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> logits (B, T, V) for every position at once."""
        return self.decode(tgt_in, self.encode(src))

    def decode_step(self, y: torch.Tensor, memory: tuple, cache: dict | None) -> tuple[torch.Tensor, dict]:
        """One step: y (B,) the previous target token -> logits (B, V) and the grown cache.

        The cache holds every layer's self-attention keys/values of the steps so far and the
        cross-attention keys/values of the encoder output, so each step costs O(T), not O(T^2).
        """
        cache = {} if cache is None else cache
        return self.decode(y[:, None], memory, cache)[:, -1], cache
