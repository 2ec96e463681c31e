"""
Benchmarks that print ratios against a baseline measured in the same run, on the same machine
(shared machines are noisy: every figure is the median of `repeats` interleaved runs).

    python bench.py --bench=decode --ckpt=out/multi30k/best.pt --dataset=../shared/data/multi30k_en_de
    python bench.py --bench=train --dataset=../shared/data/multi30k_en_de   # needs requirements-bench.txt

decode: on a checkpoint's test split, in batches of `batch_size` sentences sorted by length,
    greedy without a cache (the decoder re-reads the whole prefix every step) vs greedy with the
    key/value cache (must give identical output), and beam search vs greedy (sentences/s and
    test BLEU).
train: training-step throughput (target tokens/s: forward, backward, clipping, AdamW step) on
    the same fixed Multi30k batches for this project's Transformer, torch.nn.Transformer and
    Hugging Face MarianMT built at the same sizes (no weights downloaded), and this project's
    GRU with attention; fp32 and bf16 autocast.
Results are printed as a table and written to `out_json`.
"""

import json
import math
import platform
import statistics
import time

import torch
import torch.nn as nn

import train
from checkpoint import build_model, data_of_checkpoint, load_checkpoint, model_from_checkpoint
from configurator import ConfigError, configure, main_guard
from data import DataError
from decoding import (beam_search, greedy, greedy_uncached, length_sorted_batches, max_target_len, score,
                      strip_special)
from data import collate, load_data, make_batches
from model_transformer import sinusoidal_positions
from train import setup_device

# -----------------------------------------------------------------------------
bench = "decode"  # which benchmark: 'decode' or 'train'
ckpt = "out/multi30k/best.pt"  # decode: checkpoint to decode with
config = "config/transformer_multi30k.py"  # train: the Transformer's model, data and batch settings
rnn_config = "config/rnn_attn_en_de.py"  # train: the GRU's model settings
steps = 10  # train: timed optimizer steps per model and repeat (after warmup_steps untimed ones)
warmup_steps = 3  # train: untimed steps first (allocator, kernel selection)
dtypes = "float32,bfloat16"  # train: comma-separated
dataset = ""  # a local folder to read instead of the checkpoint's dataset (no network)
split = "test"  # split whose sources are translated
batch_size = 64  # sentences per batch
beam = 5  # beam size compared with greedy
alpha = 0.6  # length penalty of the beam search
repeats = 3  # interleaved repeats per method; the median is reported
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'bfloat16', 'float16', 'float32'
threads = 0  # torch CPU threads (0 = torch's default)
out_json = ""  # where the results are written ('' = bench_<bench>.json)
# -----------------------------------------------------------------------------


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def bench_decode() -> dict:
    checkpoint = load_checkpoint(ckpt)
    model, src_tok, tgt_tok = model_from_checkpoint(checkpoint)
    dev, amp, _, dtype_name = setup_device(device, dtype)
    model.to(dev).eval()
    sp = data_of_checkpoint(checkpoint, dataset, verbose=False).splits[split]
    encoded = [src_tok.encode(t) for t in sp.src_text]
    batches = [(idx, src.to(dev)) for idx, src in length_sorted_batches(encoded, src_tok.pad_id, src_tok.eos_id,
                                                                         batch_size)]
    refs = [sp.tgt_text[i] for idx, _ in batches for i in idx]          # in decoding order
    n = len(refs)
    bos, eos, pad = tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id

    def run(method: str) -> list[list[int]]:
        hyps = []
        with torch.no_grad(), amp:
            for _, src in batches:
                limit = max_target_len(src.shape[1])
                if method == "greedy, no cache":
                    out = greedy_uncached(model, src, bos, eos, pad, limit).tolist()
                elif method == "greedy, cached":
                    out = greedy(model, src, bos, eos, pad, limit)[0].tolist()
                else:
                    out = [found[0][0] for found in beam_search(model, src, bos, eos, limit, beam, alpha)]
                hyps += [strip_special(h, eos) for h in out]
        return hyps

    methods = ["greedy, no cache", "greedy, cached", f"beam {beam}"]
    run("greedy, cached")                                   # warm-up (allocator, kernels)
    seconds = {m: [] for m in methods}
    outputs = {}
    for r in range(repeats):
        for m in methods:                                   # interleaved: drift hits all methods alike
            s, outputs[m] = timed(lambda: run(m))
            seconds[m].append(s)
            print(f"repeat {r + 1}/{repeats}: {m:>18}: {s:7.2f} s")
    rows = {}
    for m in methods:
        med = statistics.median(seconds[m])
        bleu = score([tgt_tok.decode(h) for h in outputs[m]], refs)["bleu"]
        rows[m] = {"seconds": med, "sentences_per_s": n / med, "bleu": bleu, "all_seconds": seconds[m]}
    base = rows["greedy, no cache"]["seconds"]
    identical = outputs["greedy, no cache"] == outputs["greedy, cached"]
    print(f"\n{n} sentences of {ckpt} ({split}), batch {batch_size}, {dtype_name} on {dev}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print("| method | seconds | sentences/s | speed vs no cache | BLEU |\n|---|---|---|---|---|")
    for m, row in rows.items():
        print(f"| {m} | {row['seconds']:.2f} | {row['sentences_per_s']:.1f} | {base / row['seconds']:.2f}x "
              f"| {row['bleu']:.2f} |")
    print(f"cached output identical to uncached: {identical}")
    print(f"beam {beam} (alpha {alpha}) BLEU gain over greedy: "
          f"{rows[f'beam {beam}']['bleu'] - rows['greedy, cached']['bleu']:+.2f}")
    return {"bench": "decode", "ckpt": ckpt, "split": split, "sentences": n, "batch_size": batch_size,
            "dtype": dtype_name, "device": dev, "threads": torch.get_num_threads(), "repeats": repeats,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "cached_identical_to_uncached": identical, "methods": rows}


# -----------------------------------------------------------------------------
# training throughput

class TorchTransformer(nn.Module):
    """torch.nn.Transformer at our sizes, with the same embeddings (shared, scaled by sqrt(D)),
    sinusoidal positions, pre-/post-LN choice and tied output projection."""

    def __init__(self, cfg: dict):
        super().__init__()
        D, V = cfg["d_model"], cfg["tgt_vocab"]
        self.pad_id, self.scale = cfg["pad_id"], math.sqrt(D)
        self.embed = nn.Embedding(V, D)
        self.register_buffer("positions", sinusoidal_positions(1024, D), persistent=False)
        self.core = nn.Transformer(D, cfg["n_head"], cfg["n_enc_layer"], cfg["n_dec_layer"], cfg["d_ff"],
                                   cfg["dropout"], batch_first=True, norm_first=cfg["pre_norm"])
        self.out_proj = nn.Linear(D, V, bias=False)
        self.out_proj.weight = self.embed.weight

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        S, T = src.shape[1], tgt_in.shape[1]
        x = self.embed(src) * self.scale + self.positions[:S]
        y = self.embed(tgt_in) * self.scale + self.positions[:T]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=src.device)
        h = self.core(x, y, tgt_mask=causal, src_key_padding_mask=src == self.pad_id,
                      memory_key_padding_mask=src == self.pad_id, tgt_is_causal=True)
        return self.out_proj(h)                                             # (B, T, V)


class Marian(nn.Module):
    """Hugging Face MarianMT built from a config at our sizes (random weights, nothing downloaded)."""

    def __init__(self, cfg: dict, bos_id: int, eos_id: int):
        super().__init__()
        from transformers import MarianConfig, MarianMTModel
        self.pad_id = cfg["pad_id"]
        self.model = MarianMTModel(MarianConfig(
            vocab_size=cfg["tgt_vocab"], d_model=cfg["d_model"], encoder_layers=cfg["n_enc_layer"],
            decoder_layers=cfg["n_dec_layer"], encoder_attention_heads=cfg["n_head"],
            decoder_attention_heads=cfg["n_head"], encoder_ffn_dim=cfg["d_ff"], decoder_ffn_dim=cfg["d_ff"],
            dropout=cfg["dropout"], attention_dropout=cfg["dropout"], activation_function="relu",
            pad_token_id=self.pad_id, eos_token_id=eos_id, decoder_start_token_id=bos_id,
            max_position_embeddings=1024, share_encoder_decoder_embeddings=True, scale_embedding=True))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=src, attention_mask=src != self.pad_id, decoder_input_ids=tgt_in,
                          decoder_attention_mask=tgt_in != self.pad_id).logits


def load_config(path: str) -> dict:
    """train.py's knobs with a config file (and --dataset) applied, as train.py would see them."""
    cfg = train.knobs()
    configure(cfg, [path] + ([f"--dataset={dataset}"] if dataset else []))
    return cfg


def bench_train() -> dict:
    cfg, rnn_cfg = load_config(config), load_config(rnn_config)
    data = load_data(train.data_config_from(cfg), verbose=False)
    if train.data_config_from(rnn_cfg) != train.data_config_from(cfg):
        raise ConfigError(f"{rnn_config} and {config} must use the same data settings (tokenizer, vocab, batches)")
    tok, sp = data.tgt_tok, data.splits["train"]
    idx = make_batches(sp.src_lens, sp.tgt_lens, cfg["batch_tokens"], seed=cfg["seed"])[:warmup_steps + steps]
    batches = [collate(sp, i, data.src_tok, tok) for i in idx]
    n_tokens = sum(int((b[2] != tok.pad_id).sum()) for b in batches[warmup_steps:])
    model_cfg = train.model_config_from(cfg, data.src_tok, tok)
    builders = {
        "this project, Transformer": lambda: build_model("transformer", model_cfg, verbose=False),
        "torch.nn.Transformer": lambda: TorchTransformer(model_cfg),
        "MarianMT (transformers)": lambda: Marian(model_cfg, tok.bos_id, tok.eos_id),
        "this project, GRU + attention": lambda: build_model("rnn", train.model_config_from(rnn_cfg, data.src_tok, tok),
                                                             verbose=False),
    }
    results = {}
    for dtype_name in [d.strip() for d in dtypes.split(",") if d.strip()]:
        dev, amp, _, _ = setup_device(device, dtype_name)
        runs = {}
        for name, build in builders.items():
            torch.manual_seed(0)
            model = build().to(dev).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg["weight_decay"],
                                          betas=(cfg["beta1"], cfg["beta2"]), fused=True)
            runs[name] = (model, optimizer)

        def step(model, optimizer, src, tgt_in, tgt_out):
            with amp:
                logits = model(src, tgt_in)
            loss = train.sequence_loss(logits, tgt_out, tok.pad_id, cfg["label_smoothing"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = {name: [] for name in runs}
        for r in range(repeats):
            for name, (model, optimizer) in runs.items():        # interleaved, as in bench_decode
                moved = [tuple(t.to(dev) for t in b) for b in batches]
                for b in moved[:warmup_steps]:
                    step(model, optimizer, *b)
                s, _ = timed(lambda: [step(model, optimizer, *b) for b in moved[warmup_steps:]])
                seconds[name].append(s)
                print(f"{dtype_name} repeat {r + 1}/{repeats}: {name:>30}: {n_tokens / s:8,.0f} target tokens/s")
        results[dtype_name] = {name: {"tokens_per_s": n_tokens / statistics.median(ts), "all_seconds": ts,
                                      "parameters": sum(p.numel() for p in runs[name][0].parameters())}
                               for name, ts in seconds.items()}
    ours = "this project, Transformer"
    print(f"\ntraining steps on {steps} fixed batches of {cfg['batch_tokens']} tokens ({n_tokens:,} target tokens), "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print("| dtype | model | parameters | target tokens/s | this project's Transformer is |\n|---|---|---|---|---|")
    for dtype_name, rows in results.items():
        for name, row in rows.items():
            ratio = rows[ours]["tokens_per_s"] / row["tokens_per_s"]
            print(f"| {dtype_name} | {name} | {row['parameters']:,} | {row['tokens_per_s']:,.0f} | "
                  f"{ratio:.2f}x as fast |")
    return {"bench": "train", "config": config, "rnn_config": rnn_config, "steps": steps, "target_tokens": n_tokens,
            "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "results": results}


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    if threads > 0:
        torch.set_num_threads(threads)
    benches = {"decode": bench_decode, "train": bench_train}
    if bench not in benches:
        raise ConfigError(f"bench='{bench}' is not known: use one of {', '.join(benches)}")
    result = benches[bench]()
    path = out_json or f"bench_{bench}.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written to {path}")


if __name__ == "__main__":
    main_guard(main, DataError)
