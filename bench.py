"""
Benchmarks that print ratios against a baseline measured in the same run, on the same machine
(shared machines are noisy: every figure is the median of `repeats` interleaved runs).

    python bench.py --bench=decode --ckpt=out/multi30k/best.pt --dataset=../shared/data/multi30k_en_de

decode: on a checkpoint's test split, in batches of `batch_size` sentences sorted by length,
    greedy without a cache (the decoder re-reads the whole prefix every step) vs greedy with the
    key/value cache (must give identical output), and beam search vs greedy (sentences/s and
    test BLEU).
Results are printed as a table and written to `out_json`.
"""

import json
import platform
import statistics
import time

import torch

from checkpoint import data_of_checkpoint, load_checkpoint, model_from_checkpoint
from configurator import ConfigError, configure, main_guard
from data import DataError
from decoding import (beam_search, greedy, greedy_uncached, length_sorted_batches, max_target_len, score,
                      strip_special)
from train import setup_device

# -----------------------------------------------------------------------------
bench = "decode"  # which benchmark: 'decode'
ckpt = "out/multi30k/best.pt"  # checkpoint to decode with
dataset = ""  # a local folder to read instead of the checkpoint's dataset (no network)
split = "test"  # split whose sources are translated
batch_size = 64  # sentences per batch
beam = 5  # beam size compared with greedy
alpha = 0.6  # length penalty of the beam search
repeats = 3  # interleaved repeats per method; the median is reported
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'bfloat16', 'float16', 'float32'
threads = 0  # torch CPU threads (0 = torch's default)
out_json = "bench_decode.json"  # where the results are written
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


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    if threads > 0:
        torch.set_num_threads(threads)
    if bench != "decode":
        raise ConfigError(f"bench='{bench}' is not known: use 'decode'")
    result = bench_decode()
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written to {out_json}")


if __name__ == "__main__":
    main_guard(main, DataError)
