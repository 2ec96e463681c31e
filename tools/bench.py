"""
Benchmarks that print ratios against a baseline measured in the same run, on the same machine
(shared machines are noisy: every figure is the median of `repeats` interleaved runs).

    python tools/bench.py --bench=decode --ckpt=out/multi30k/best.pt --dataset=../shared/data/multi30k_en_de
    python tools/bench.py --bench=train --dataset=../shared/data/multi30k_en_de   # needs requirements-bench.txt
    python tools/bench.py --bench=loop --dataset=../shared/data/multi30k_en_de --dtype=bfloat16
    python tools/bench.py --bench=generate --dataset=../shared/data/multi30k_en_de              # the same
    python tools/bench.py --bench=quality --dataset=../shared/data/multi30k_en_de --minutes=10   # the same
    python tools/bench.py --bench=diagnostics --dataset=../shared/data/multi30k_en_de           # the same

decode: on a checkpoint's test split, in batches of `batch_size` sentences sorted by length,
    greedy without a cache (the decoder re-reads the whole prefix every step) vs greedy with the
    key/value cache (must give identical output), and beam search vs greedy (sentences/s and
    test BLEU).
train: training-step throughput (target tokens/s) of train.py's own train_step (forward, loss,
    backward, gradient norms, clipping, AdamW step) on the same fixed Multi30k batches for this
    project's Transformer, torch.nn.Transformer and Hugging Face MarianMT built at the same sizes
    (no weights downloaded; left out with a note where transformers is missing), and this
    project's GRU with attention; fp32 and bf16 autocast, or fp16 with train.py's loss scaling. The
    baselines use F.cross_entropy with label smoothing (the loss their users write), this
    project's models loss.py; one more row runs our Transformer with F.cross_entropy to show the
    model's share apart. Also model FLOP utilisation (matmul FLOPs counted by torch over a
    2048x2048 matmul measured in the same run) and peak memory of each.
loop: train.py's loop (train.loop_step on the run's own batches, new shapes every step, the
    schedule's clocks moved on as train_loop moves them, plus the step log's bookkeeping) against
    the fixed-batch step of `train`, in turns step by step on one model; the loop's learning rate
    of every turn goes to out_json. --profile_steps=N then profiles N turns of the loop.
generate: decoding speed of this project's cached greedy vs MarianMT's generate(), untrained,
    every sentence forced to the same length so both do the same steps.
quality: this project's Transformer and MarianMT trained for `minutes` each on the same batches,
    schedule shape and optimizer (MarianMT at its own peak learning rate, `marian_lr`), then
    test BLEU and decoding speed (our greedy and beam search vs MarianMT's generate with the
    same settings).
diagnostics: what the diagnostics that name bugs (docs/debugging.md) cost against train.py's step
    on the config's own batches: the probes before step 1 (once a run), the step log's checks at a
    log line (kept gradients, the weights' norm), its batch check (every step, in overfit mode
    only), Symptoms on a record.
Results are printed as a table and written to `out_json`.
"""

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import sys
from dataclasses import asdict

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
import train  # noqa: E402
from checkpoint import load_checkpoint, model_from_checkpoint, model_of  # noqa: E402
from common import RunLog, StepLog  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402
from batching import TrainBatches, collate, make_batches  # noqa: E402
from data import DataConfig, DataError, data_of_checkpoint, load_data  # noqa: E402
from decoding import (beam_search, evaluate, greedy, length_sorted_batches, max_target_len, score,  # noqa: E402
                      strip_special)
from diagnostics import check_initial_loss, probe_model  # noqa: E402
from loss import sequence_loss  # noqa: E402
from runtime import Runtime, advance_clock, setup  # noqa: E402
from tools.baselines import Marian, TorchTransformer, torch_loss  # noqa: E402
from tools.reference import greedy_uncached  # noqa: E402
from watch import StepChecks, Symptoms  # noqa: E402

# -----------------------------------------------------------------------------
bench = "decode"  # which benchmark: 'decode', 'train', 'loop', 'generate', 'quality' or 'diagnostics'
minutes = 10.0  # quality: training budget per model
marian_lr = 5e-4  # quality: MarianMT's peak learning rate (0 = the config's); post-LN layers did not learn at 1.5e-3
ckpt = "out/multi30k/best.pt"  # decode: checkpoint to decode with
config = "config/transformer_multi30k.py"  # train, loop, diagnostics: the Transformer's model, data and batch settings
rnn_config = "config/rnn_attn_en_de.py"  # train: the GRU's model settings
steps = 10  # train, loop, diagnostics: timed optimizer steps per model and repeat (after warmup_steps untimed ones)
warmup_steps = 3  # train, loop, diagnostics: untimed steps first (allocator, kernel selection)
loop_rounds = 4  # loop: steps per repeat = loop_rounds x (warmup_steps + steps), the fixed batches cycled
profile_steps = 0  # loop: > 0 profiles that many turns of the loop afterwards (torch.profiler) and prints the table
dtypes = "float32,bfloat16"  # train: comma-separated
models = "ours,ours_ce,torch,marian,gru"  # train: the rows, comma-separated, ours first (the ratios are against it)
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
overwrite = False  # may replace an existing out_json file (otherwise the bench is refused before it runs)
# -----------------------------------------------------------------------------


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def rotated(items: list, k: int) -> list:
    """items started at position k (mod len): each batch changes which method runs first, so that
    no method always follows the same one (what one leaves in caches and the allocator differs)."""
    k %= len(items)
    return items[k:] + items[:k]


def in_turns(methods, run, batches, untimed: int = 0) -> tuple[dict, dict]:
    """Time run(method, batch) -> list for every method on every batch, `repeats` times, in
    turns batch by batch (A, B, C on batch 1, then B, C, A on batch 2, ...) so that the load
    changes of a shared machine, which last seconds, hit all methods alike. The first `untimed`
    batches of every repeat are run the same way but not counted (training's warm-up steps);
    with none, one run of the first method on the first batch warms up (allocator, kernel
    selection). Returns ({method: [seconds of each repeat]}, {method: its outputs of the last
    repeat, batch after batch})."""
    if not untimed:
        run(next(iter(methods)), batches[0])
    seconds = {m: [] for m in methods}
    for r in range(repeats):
        total, outputs = dict.fromkeys(methods, 0.0), {m: [] for m in methods}
        for i, batch in enumerate(batches):
            for m in rotated(list(methods), i + r):
                sec, out = timed(lambda: run(m, batch))
                if i >= untimed:
                    total[m] += sec
                    outputs[m] += out
        for m in methods:
            seconds[m].append(total[m])
            print(f"repeat {r + 1}/{repeats}: {m:>42}: {total[m]:7.2f} s")
    return seconds, outputs


def sorted_batches(src_tok, sentences: list[str], dev: str) -> list[tuple[list[int], torch.Tensor]]:
    """The sentences as length-sorted batches of `batch_size` on the device: (input indices, (B, S) ids)."""
    encoded = [src_tok.encode(t) for t in sentences]
    return [(idx, src.to(dev)) for idx, src in length_sorted_batches(encoded, src_tok.pad_id, src_tok.eos_id,
                                                                      batch_size)]


def bench_decode() -> dict:
    checkpoint = load_checkpoint(ckpt)
    model, src_tok, tgt_tok = model_from_checkpoint(checkpoint)
    rt = setup(device, dtype)
    dev, amp, dtype_name = rt.device, rt.amp, rt.dtype
    model.to(dev).eval()
    sp = data_of_checkpoint(checkpoint, dataset, verbose=False).splits[split]
    batches = sorted_batches(src_tok, sp.src_text, dev)
    refs = [sp.tgt_text[i] for idx, _ in batches for i in idx]          # in decoding order
    n = len(refs)
    bos, eos, pad = tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id

    def run(method: str, src: torch.Tensor) -> list[list[int]]:
        limit = max_target_len(src.shape[1])
        with torch.no_grad(), amp:
            if method == "greedy, no cache":
                out = greedy_uncached(model, src, bos, eos, pad, limit).tolist()
            elif method == "greedy, cached":
                out = greedy(model, src, bos, eos, pad, limit)[0].tolist()
            else:
                out = [found[0][0] for found in beam_search(model, src, bos, eos, limit, beam, alpha)]
        return [strip_special(h, eos) for h in out]

    methods = ["greedy, no cache", "greedy, cached", f"beam {beam}"]
    seconds, outputs = in_turns(methods, run, [src for _, src in batches])
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


def load_config(path: str) -> dict:
    """train.py's knobs with a config file (and --dataset) applied, as train.py would see them."""
    cfg = dict(train.DEFAULTS)
    configure(cfg, [path] + ([f"--dataset={dataset}"] if dataset else []))
    return cfg


def build(name: str, model_cfg: dict, rnn_model_cfg: dict, bos_id: int, eos_id: int) -> nn.Module:
    """The model of a row; this project's as its checkpoints are loaded (with speed.py's stand-ins)."""
    if name in (OURS, OURS_TORCH_LOSS):
        return model_of("transformer", model_cfg)
    if name == "torch.nn.Transformer":
        return TorchTransformer(model_cfg)
    if name == MARIAN:
        return Marian(model_cfg, bos_id, eos_id)
    return model_of("rnn", rnn_model_cfg)


OURS, MARIAN = "this project, Transformer", "MarianMT (transformers)"
OURS_TORCH_LOSS = "this project, Transformer, F.cross_entropy"   # ours with the baselines' loss
MODELS = {"ours": OURS, "ours_ce": OURS_TORCH_LOSS, "torch": "torch.nn.Transformer", "marian": MARIAN,
          "gru": "this project, GRU + attention"}      # the `models` knob's names -> the rows


def step(name: str, model, optimizer, batch: tuple, pad_id: int, cfg: dict, rt: Runtime) -> dict:
    """One optimizer step on one batch. This project's models take train.py's own train_step; the
    baselines the same work with the loss their users write (F.cross_entropy): forward, loss,
    backward, then train.py's update (gradient norms, clipping, the optimizer's step). rt: the
    model's own (own_runtime), whose fp16 loss scaler is the model's, as train.py runs fp16."""
    if name not in (OURS_TORCH_LOSS, "torch.nn.Transformer", MARIAN):
        return train.train_step(model, optimizer, [batch], pad_id, cfg, rt)
    src, tgt_in, tgt_out = rt.to_device(*batch)
    n_tok = (tgt_out != pad_id).sum().to(torch.float32)
    with rt.amp:
        logits = model(src, tgt_in)
    loss = torch_loss(logits, tgt_out, pad_id, cfg["label_smoothing"]) / n_tok
    rt.backward(loss)
    return train.update(model, optimizer, loss.detach(), n_tok, cfg, rt)


def own_runtime(rt: Runtime, optimizer, cfg: dict) -> Runtime:
    """A copy of rt for one model and its optimizer, as train_loop starts it (in fp16, a loss scaler of its own)."""
    own = dataclasses.replace(rt)
    own.start(optimizer, cfg, None, train.RunState)
    return own


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg["weight_decay"],
                             betas=(0.9, 0.98), fused=True)


def matmul_peak(dev: str, dtype_name: str, n: int = 2048) -> float:
    """FLOP/s of an n x n matrix product in this dtype, measured now (median of 5): the
    denominator of model FLOP utilisation."""
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    a @ b
    return 2 * n ** 3 / statistics.median([timed(lambda: a @ b)[0] for _ in range(5)])


def step_flops(name: str, model, optimizer, rt: Runtime, batches, pad_id: int, cfg: dict) -> int:
    """Matrix-product FLOPs of training steps over `batches`, counted by torch's FlopCounterMode
    (matmuls and attention, forward and backward; element-wise work and the optimizer are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        for b in batches:
            step(name, model, optimizer, b, pad_id, cfg, rt)      # (no matrix product in a loss)
    return counter.get_total_flops()


def peak_memory(name: str, dtype_name: str, args: tuple) -> int:
    """Bytes of memory a model's training steps take at their peak (weights, gradients, optimizer
    moments, activations). CUDA: the allocator's peak. CPU: the growth of the peak resident set
    size of a fresh process, so that one model's freed memory does not hide the next one's."""
    model_cfg, rnn_model_cfg, bos_id, eos_id, batches, pad_id, cfg, dev = args
    rt = setup(dev, dtype_name)
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    model = build(name, model_cfg, rnn_model_cfg, bos_id, eos_id).to(dev).train()
    optimizer = make_optimizer(model, cfg)
    rt = own_runtime(rt, optimizer, cfg)
    for b in batches:
        step(name, model, optimizer, b, pad_id, cfg, rt)
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - before
    # VmHWM: this process's peak resident set (ru_maxrss would also count the parent's, kept across exec)
    peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return peak_kib * 1024 - before


def importable(names: list[str]) -> tuple[list[str], list[str]]:
    """The rows that can run here, and a note for each left out: MarianMT needs transformers
    (requirements-bench.txt), which a GPU machine may lack; the other rows are still worth having."""
    if "marian" not in names:
        return names, []
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        note = f"{MARIAN} left out: transformers cannot be imported ({e}); pip install -r requirements-bench.txt"
        print(note)
        return [n for n in names if n != "marian"], [note]
    return names, []


def bench_train() -> dict:
    names = [m.strip() for m in models.split(",") if m.strip()]
    if names[:1] != ["ours"] or not set(names) <= set(MODELS):
        raise ConfigError(f"models='{models}': 'ours' first, then any of {', '.join(list(MODELS)[1:])}")
    names, notes = importable(names)
    cfg, rnn_cfg = load_config(config), load_config(rnn_config if "gru" in names else config)
    data = load_data(DataConfig.of(cfg), verbose=False)
    if DataConfig.of(rnn_cfg) != DataConfig.of(cfg):
        raise ConfigError(f"{rnn_config} and {config} must use the same data settings (tokenizer, vocab, batches)")
    tok, sp = data.tgt_tok, data.splits["train"]
    idx = make_batches(sp.src_lens, sp.tgt_lens, cfg["batch_tokens"], seed=cfg["seed"])[:warmup_steps + steps]
    batches = [collate(sp, i, data.src_tok, tok) for i in idx]
    n_tokens = sum(int((b[2] != tok.pad_id).sum()) for b in batches[warmup_steps:])
    model_cfg = asdict(train.build_model(cfg, data.src_tok, tok, verbose=False).cfg)
    rnn_model_cfg = asdict(train.build_model(rnn_cfg, data.src_tok, tok, verbose=False).cfg) if "gru" in names else {}
    results = {}
    for dtype_name in [d.strip() for d in dtypes.split(",") if d.strip()]:
        rt = setup(device, dtype_name)
        dev = rt.device
        runs = {}
        for name in (MODELS[m] for m in names):
            torch.manual_seed(0)
            model = build(name, model_cfg, rnn_model_cfg, tok.bos_id, tok.eos_id).to(dev).train()
            optimizer = make_optimizer(model, cfg)
            runs[name] = (model, optimizer, own_runtime(rt, optimizer, cfg))   # a scaler of its own under fp16

        def run(name: str, batch: tuple) -> list:
            model, optimizer, own = runs[name]
            step(name, model, optimizer, batch, tok.pad_id, cfg, own)
            return []
        print(f"{dtype_name}: {steps} timed steps of every model")
        seconds, _ = in_turns(runs, run, batches, untimed=warmup_steps)  # in turns step by step
        peak = matmul_peak(dev, dtype_name)
        mp = multiprocessing.get_context("spawn")
        rows = {}
        for name, (model, optimizer, own) in runs.items():
            flops = step_flops(name, model, optimizer, own, batches[warmup_steps:], tok.pad_id, cfg)
            median = statistics.median(seconds[name])
            args = (model_cfg, rnn_model_cfg, tok.bos_id, tok.eos_id, batches[:2], tok.pad_id, cfg, dev)
            if dev.startswith("cuda"):
                memory = peak_memory(name, dtype_name, args)
            else:
                with mp.Pool(1) as pool:
                    memory = pool.apply(peak_memory, (name, dtype_name, args))
            rows[name] = {"tokens_per_s": n_tokens / median, "all_seconds": seconds[name],
                          "parameters": sum(p.numel() for p in model.parameters()),
                          "flops": flops, "flop_per_s": flops / median, "mfu": flops / median / peak,
                          "peak_memory_bytes": memory}
        results[dtype_name] = {"matmul_peak_flop_per_s": peak, "models": rows}
    print(f"\ntraining steps on {steps} fixed batches of {cfg['batch_tokens']} tokens ({n_tokens:,} target tokens), "
          f"{torch.get_num_threads()} threads, median of {repeats}; MFU = counted matmul FLOP/s over a "
          f"2048x2048 matmul's FLOP/s in the same dtype, measured in this run")
    print("| dtype | model | parameters | target tokens/s | this project's Transformer is | GFLOP/s | MFU "
          "| peak memory |\n|---|---|---|---|---|---|---|---|")
    for dtype_name, res in results.items():
        rows = res["models"]
        for name, row in rows.items():
            ratio = rows[OURS]["tokens_per_s"] / row["tokens_per_s"]
            print(f"| {dtype_name} | {name} | {row['parameters']:,} | {row['tokens_per_s']:,.0f} | "
                  f"{ratio:.2f}x as fast | {row['flop_per_s'] / 1e9:.0f} | {row['mfu']:.1%} | "
                  f"{row['peak_memory_bytes'] / 2**20:,.0f} MiB |")
        print(f"| {dtype_name} | (matmul peak, 2048x2048) | | | | {res['matmul_peak_flop_per_s'] / 1e9:.0f} | 100% | |")
    print("\n".join(notes))
    return {"bench": "train", "config": config, "rnn_config": rnn_config, "steps": steps, "target_tokens": n_tokens,
            "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "notes": notes, "results": results}


def bench_loop() -> dict:
    """train.py's loop against its own fixed-batch step, in turns on one model: the loop's turn
    (train.loop_step on the run's own batches, epoch after epoch, plus the step log's bookkeeping)
    and the fixed-batch step of --bench=train (train_step cycling over the first few batches)."""
    cfg = load_config(config)
    data = load_data(DataConfig.of(cfg), verbose=False)
    rt = setup(device, dtype)
    tok, sp = data.tgt_tok, data.splits["train"]
    torch.manual_seed(cfg["seed"])
    model = train.build_model(cfg, data.src_tok, tok, verbose=False).to(rt.device).train()
    optimizer = train.make_optimizer(model, cfg)
    rt = own_runtime(rt, optimizer, cfg)
    fixed = [collate(sp, i, data.src_tok, tok) for i in
             make_batches(sp.src_lens, sp.tgt_lens, cfg["batch_tokens"], seed=cfg["seed"])[:warmup_steps + steps]]
    batches, state = TrainBatches(data, cfg["batch_tokens"], cfg["seed"]), train.RunState()
    steps_log = StepLog(RunLog("", enabled=False), data.src_tok.pad_id, tok.pad_id)
    tokens = {LOOP: [], FIXED: []}                  # target tokens of every call, in call order
    lrs = []                                        # the learning rate of every turn of the loop

    def run(method: str, i: int) -> list:
        if method == FIXED:
            out = train.train_step(model, optimizer, [fixed[i % len(fixed)]], tok.pad_id, cfg, rt)
        else:
            lr, micro_batches, out = loop_turn(model, optimizer, batches, state, cfg, rt)
            lrs.append(lr)
            progress = train.run_progress(state.step, batches.epochs_done(state.epoch, state.batch_in_epoch),
                                          state.time_progress, cfg)
            steps_log.add(state, lr, out, micro_batches, progress)
        tokens[method].append(out["tokens"])
        return []

    n = len(fixed) * loop_rounds
    print(f"{n} steps of each, {warmup_steps} untimed, {repeats} repeats")
    seconds, _ = in_turns([LOOP, FIXED], run, list(range(n)), untimed=warmup_steps)
    rows = {}
    for m in (LOOP, FIXED):
        per_repeat = [sum(tokens[m][r * n + warmup_steps:(r + 1) * n]) for r in range(repeats)]
        rates = [t / s for t, s in zip(per_repeat, seconds[m])]
        rows[m] = {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates, "all_seconds": seconds[m]}
    profile = profile_loop(model, optimizer, batches, state, cfg, rt) if profile_steps else None
    ratio = rows[FIXED]["tokens_per_s"] / rows[LOOP]["tokens_per_s"]
    print(f"\n{config}, {rt.dtype} on {rt.device}, {torch.get_num_threads()} threads, {cfg['batch_tokens']} "
          f"tokens per batch, median of {repeats}")
    print("| method | target tokens/s |\n|---|---|")
    for m, row in rows.items():
        print(f"| {m} | {row['tokens_per_s']:,.0f} |")
    print(f"the fixed-batch step is {ratio:.2f}x as fast as the loop; the loop's learning rate went from "
          f"{lrs[0]:.2e} to {lrs[-1]:.2e}")
    return {"bench": "loop", "config": config, "dtype": rt.dtype, "device": rt.device, "steps": n,
            "threads": torch.get_num_threads(), "repeats": repeats, "methods": rows, "fixed_over_loop": ratio,
            "lrs": lrs, "profile": profile, "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__}


LOOP, FIXED = "train.py's loop (its own batches)", "fixed-batch step (--bench=train)"


def loop_turn(model, optimizer, batches, run, cfg: dict, rt: Runtime) -> tuple:
    """One turn of train.py's loop as train_loop takes it: (lr, the CPU batches, train_step's report).
    The run's clocks move on by the loop's own time (the fixed-batch turns between are not the
    loop's): under max_minutes the schedule's clock is that time, and without it every step would
    train at lr_at(0) = 0."""
    started = time.perf_counter()
    turn = train.loop_step(model, optimizer, batches, run, batches.epochs_done(run.epoch, run.batch_in_epoch), cfg, rt)
    run.step += turn[2]["update"] != "skipped"      # as train_loop counts steps
    loop_minutes = run.train_minutes + (time.perf_counter() - started) / 60
    advance_clock(run, loop_minutes, loop_minutes, cfg)
    return turn


def profile_loop(model, optimizer, batches, run, cfg: dict, rt: Runtime) -> str:
    """torch.profiler over profile_steps turns of the loop: the operators that take the time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(profile_steps):
            loop_turn(model, optimizer, batches, run, cfg, rt)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    print(table)
    return table


def marian_generate(model: Marian, src: torch.Tensor, limit: int, beams: int, eos_id: int) -> list[list[int]]:
    """Hugging Face generate() with greedy (beams=1) or beam search; ids without the start token."""
    out = model.model.generate(input_ids=src, attention_mask=src != model.pad_id, num_beams=beams,
                               do_sample=False, max_new_tokens=limit, length_penalty=alpha if beams > 1 else 1.0,
                               early_stopping=True)
    return [strip_special(row[1:], eos_id) for row in out.tolist()]


def bench_generate() -> dict:
    """Decoder speed alone: this project's cached greedy decoding vs MarianMT's generate() (its own
    key/value cache), both untrained at the same sizes and forced to write exactly the length
    limit of each batch (<eos> never ends a sentence), so both do the same number of steps
    whatever their weights would say."""
    cfg = load_config(config)
    data = load_data(DataConfig.of(cfg), verbose=False)
    rt = setup(device, dtype)
    dev, amp, dtype_name = rt.device, rt.amp, rt.dtype
    tok = data.tgt_tok
    model_cfg = asdict(train.build_model(cfg, data.src_tok, tok, verbose=False).cfg)
    torch.manual_seed(0)
    ours = build(OURS, model_cfg, None, tok.bos_id, tok.eos_id).to(dev).eval()
    marian = build(MARIAN, model_cfg, None, tok.bos_id, tok.eos_id).to(dev).eval()
    batches = [src for _, src in sorted_batches(data.src_tok, data.splits[split].src_text, dev)]
    n_sent = sum(len(b) for b in batches)
    methods = {
        "this project, greedy (cached)": lambda src, n: greedy(ours, src, tok.bos_id, -1, tok.pad_id, n)[0],
        "MarianMT generate, greedy": lambda src, n: marian.model.generate(
            input_ids=src, attention_mask=src != marian.pad_id, num_beams=1, do_sample=False,
            min_new_tokens=n, max_new_tokens=n)[:, 1:],
    }

    def run(method, src):
        with torch.no_grad(), amp:
            return [methods[method](src, max_target_len(src.shape[1])).numel()]
    seconds, tokens = in_turns(methods, run, batches)
    rows = {m: {"seconds": statistics.median(ts), "sentences_per_s": n_sent / statistics.median(ts),
                "tokens": sum(tokens[m]), "all_seconds": ts} for m, ts in seconds.items()}
    base = rows["MarianMT generate, greedy"]["seconds"]
    print(f"\n{n_sent} {split} sentences, batch {batch_size}, every sentence decoded to its batch's length "
          f"limit, {dtype_name} on {dev}, {torch.get_num_threads()} threads, median of {repeats}")
    print("| decoder | seconds | sentences/s | tokens | speed vs MarianMT generate |\n|---|---|---|---|---|")
    for m, row in rows.items():
        print(f"| {m} | {row['seconds']:.2f} | {row['sentences_per_s']:.1f} | {row['tokens']:,} | "
              f"{base / row['seconds']:.2f}x |")
    return {"bench": "generate", "config": config, "dtype": dtype_name, "device": dev, "split": split,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "repeats": repeats, "methods": rows,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}


def bench_quality() -> dict:
    """Train this project's Transformer and MarianMT at the same sizes for `minutes` each, on the
    same batches with the same schedule shape and optimizer, then decode the test split with both."""
    cfg = load_config(config)
    data = load_data(DataConfig.of(cfg), verbose=False)
    rt = setup(device, dtype)
    dev, amp, dtype_name = rt.device, rt.amp, rt.dtype
    tok, sp = data.tgt_tok, data.splits["train"]
    model_cfg = asdict(train.build_model(cfg, data.src_tok, tok, verbose=False).cfg)
    models, curves = {}, {}
    for name in (OURS, MARIAN):
        torch.manual_seed(cfg["seed"])
        model = build(name, model_cfg, None, tok.bos_id, tok.eos_id).to(dev).train()
        optimizer = make_optimizer(model, cfg)
        own = own_runtime(rt, optimizer, cfg)
        schedule = dict(cfg, learning_rate=marian_lr) if name == MARIAN and marian_lr > 0 else cfg
        t0, step, epoch = time.time(), 0, 0
        while (time.time() - t0) / 60 < minutes:
            for idx in make_batches(sp.src_lens, sp.tgt_lens, cfg["batch_tokens"], seed=cfg["seed"], epoch=epoch):
                elapsed = (time.time() - t0) / 60
                if elapsed >= minutes:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = train.lr_at(elapsed / minutes, schedule)
                step(name, model, optimizer, collate(sp, idx, data.src_tok, tok), tok.pad_id, cfg, own)
                step += 1
                if step % 100 == 0:
                    print(f"{name}: step {step}, {elapsed:.1f} min")
            epoch += 1
        models[name] = model.eval()
        curves[name] = {"steps": step, "epochs_started": epoch + 1, "peak_lr": schedule["learning_rate"]}
    test = data.splits[split]
    batches = sorted_batches(data.src_tok, test.src_text, dev)
    refs = [test.tgt_text[i] for idx, _ in batches for i in idx]
    ours, marian = models[OURS], models[MARIAN]
    methods = {
        "this project, greedy (cached)": lambda src, n: [strip_special(h, tok.eos_id) for h in greedy(
            ours, src, tok.bos_id, tok.eos_id, tok.pad_id, n)[0].tolist()],
        f"this project, beam {beam}": lambda src, n: [f[0][0] for f in beam_search(
            ours, src, tok.bos_id, tok.eos_id, n, beam, alpha)],
        "MarianMT generate, greedy": lambda src, n: marian_generate(marian, src, n, 1, tok.eos_id),
        f"MarianMT generate, beam {beam}": lambda src, n: marian_generate(marian, src, n, beam, tok.eos_id),
    }

    def run(method, src):
        with torch.no_grad(), amp:
            return methods[method](src, max_target_len(src.shape[1]))
    seconds, outputs = in_turns(methods, run, [src for _, src in batches])
    rows = {m: {"seconds": statistics.median(ts), "sentences_per_s": len(refs) / statistics.median(ts),
                "bleu": score([tok.decode(h) for h in outputs[m]], refs)["bleu"], "all_seconds": ts}
            for m, ts in seconds.items()}
    print(f"\n{minutes:g} minutes of training each ({config}, {dtype_name}, {torch.get_num_threads()} threads): "
          + ", ".join(f"{n}: {c['steps']} steps at peak lr {c['peak_lr']:g}" for n, c in curves.items()))
    print(f"decoding {len(refs)} {split} sentences, batch {batch_size}, median of {repeats}")
    print("| model, decoding | test BLEU | sentences/s | vs MarianMT generate, greedy |\n|---|---|---|---|")
    base = rows["MarianMT generate, greedy"]["sentences_per_s"]
    for m, row in rows.items():
        print(f"| {m} | {row['bleu']:.2f} | {row['sentences_per_s']:.1f} | {row['sentences_per_s'] / base:.2f}x |")
    return {"bench": "quality", "config": config, "minutes": minutes, "dtype": dtype_name, "device": dev,
            "threads": torch.get_num_threads(), "repeats": repeats, "training": curves, "decoding": rows,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}


@torch.no_grad()
def validation_costs(model, data, cfg: dict, rt: Runtime) -> tuple[float, float]:
    """(seconds of one validation, as train.py validates; seconds of its source_gain part alone: the
    teacher-forced loss of the first batch with the sources rolled by one sentence)."""
    model.eval()
    whole = timed(lambda: evaluate(model, data, cfg["batch_tokens"], rt.device, rt.amp,
                                   n_sentences=cfg["eval_sentences"]))[0]
    sp, pad = data.splits["validation"], data.tgt_tok.pad_id

    def other_sources() -> None:
        for i, idx in enumerate(make_batches(sp.src_lens, sp.tgt_lens, cfg["batch_tokens"], shuffle=False)):
            if i == 0:
                src, tgt_in, tgt_out = (t.to(rt.device) for t in collate(sp, idx, data.src_tok, data.tgt_tok))
                with rt.amp:
                    logits = model(src.roll(1, 0), tgt_in)
                sequence_loss(logits, tgt_out, pad, 0.0).item()
    part = timed(other_sources)[0]
    model.train()
    return whole, part


def a_run(config: str) -> tuple:
    """What train.py has before its first step: (cfg, data, rt, model, optimizer, batches, RunState())."""
    cfg = load_config(config)
    data = load_data(DataConfig.of(cfg), verbose=False)
    rt = setup(device, dtype)
    torch.manual_seed(cfg["seed"])
    model = train.build_model(cfg, data.src_tok, data.tgt_tok, verbose=False).to(rt.device).train()
    optimizer = train.make_optimizer(model, cfg)
    rt = own_runtime(rt, optimizer, cfg)
    return cfg, data, rt, model, optimizer, TrainBatches(data, cfg["batch_tokens"], cfg["seed"]), train.RunState()


def the_probes(model, first: tuple, data, log, optimizer, cfg: dict, rt: Runtime, batches=None) -> None:
    """What train_loop checks before step 1 (diagnostics.py)."""
    check_initial_loss(model, first, sequence_loss, data, log)
    probe_model(model, first, sequence_loss, data, log, optimizer, cfg["label_smoothing"],
                step=train.probe_step(model, data, cfg, rt), evaluate=evaluate, batches=batches)


def a_run_begins(knobs: dict, with_probes: bool, turns: int = 10) -> float:
    """In a fresh process (this file's knobs handed over): the seconds from the model built to `turns`
    turns of the loop done, with the probes before them (as train_loop) or without."""
    globals().update(knobs)
    if threads > 0:
        torch.set_num_threads(threads)
    cfg, data, rt, model, optimizer, batches, state = a_run(config)
    with tempfile.TemporaryDirectory() as folder:
        log = RunLog(folder, True, watchers=[Symptoms()])

        def begin() -> None:
            if with_probes:
                the_probes(model, batches.next(0, 0)[0], data, log, optimizer, cfg, rt, batches)
            for _ in range(turns):
                loop_turn(model, optimizer, batches, state, cfg, rt)
        return timed(begin)[0]


def added_by_probes(step: float, pairs: int = 3) -> float:
    """What the probes add to a run, in steps: a run's first turns with them against without them,
    each in a fresh process (the cold start they share is paid once either way), in turns (median)."""
    context = multiprocessing.get_context("spawn")
    knobs = {name: globals()[name] for name in ("config", "dataset", "device", "dtype", "threads")}
    added = []
    for _ in range(pairs):
        with context.Pool(1) as pool:
            probed = pool.apply(a_run_begins, (knobs, True))
        with context.Pool(1) as pool:
            plain = pool.apply(a_run_begins, (knobs, False))
        added.append(probed - plain)
    return statistics.median(added) / step


def bench_diagnostics() -> dict:
    """The diagnostics' cost against train.py's step: each check timed after every turn of the loop
    (the median of `steps`), the probes once before the first (as a run pays them, the process cold)
    and again after the steps (the median of 5); update_ratio once; per step, a check of a log line
    counts 1 / log_interval of its time."""
    cfg, data, rt, model, optimizer, batches, state = a_run(config)
    first, at_first = batches.next(0, 0)[0], train.RunState()
    with tempfile.TemporaryDirectory() as folder:
        symptoms = Symptoms()
        log = RunLog(folder, True, watchers=[symptoms])
        steps_log = StepLog(log, data.src_tok.pad_id, data.tgt_tok.pad_id, rt.device_type,
                            StepChecks(log, model, 1, optimizer))

        def probes():                                                   # before step 1, as train_loop calls them
            the_probes(model, first, data, log, optimizer, cfg, rt, batches)
        probe_seconds = timed(probes)[0]                                # the process cold, as a run pays them
        symptoms("init", {"step": 0, "loss": 9.0, "ln_v": math.log(data.tgt_tok.vocab_size)})
        names = ("step", "gradients_kept", "weights_grow", "lr_not_applied", "optimizer_steps", "training_mode",
                 "overfit_batches_change", "batch_repeated", "symptoms")
        seconds = {name: [] for name in names}
        for i in range(warmup_steps + steps):
            sec, (lr, _, out) = timed(lambda: loop_turn(model, optimizer, batches, state, cfg, rt))
            record = {"step": state.step, "loss": out["loss"], "lr": lr}
            checks = {"step": lambda: None, "gradients_kept": lambda: steps_log.checks.gradients_cleared(state.step),
                      "weights_grow": lambda: steps_log.checks.weight_growth(state.step, lr),
                      "lr_not_applied": lambda: steps_log.checks.rate_applied(state.step, lr),
                      "optimizer_steps": lambda: steps_log.checks.optimizer_steps(state.step),
                      "training_mode": lambda: steps_log.checks.training_mode(state.step),
                      "overfit_batches_change": lambda: steps_log.checks.same_batches(at_first, [first]),
                      "batch_repeated": lambda: steps_log.checks.batch_repeated(at_first, [first]),
                      "symptoms": lambda: symptoms("train", record)}
            for name, check in checks.items():
                if i >= warmup_steps:
                    seconds[name].append(sec if name == "step" else timed(check)[0])
        turns = [(timed(probes)[0], timed(lambda: loop_turn(model, optimizer, batches, state, cfg, rt))[0])
                 for _ in range(5)]             # again, the process warmed up, in turns with a step (drift cancels)
        warm, warm_step = (statistics.median(column) for column in zip(*turns))
        checks = StepChecks(log, model)                                 # update_ratio: one update, measured once
        ratio_seconds = timed(lambda: setattr(checks, "before", [p.detach().clone() for p in checks.params]))[0] \
            + timed(lambda: checks.update_ratio(100))[0]                # (the weights kept, then compared)
    step = statistics.median(seconds.pop("step"))
    validation, gain = validation_costs(model, data, cfg, rt)
    every = {"gradients_kept": cfg["log_interval"], "weights_grow": cfg["log_interval"],
             "lr_not_applied": cfg["log_interval"], "optimizer_steps": cfg["log_interval"],
             "training_mode": cfg["log_interval"], "overfit_batches_change": 1,
             "batch_repeated": 1, "symptoms": cfg["log_interval"]}
    added = added_by_probes(step)
    rows = {"probe_model": {"when": "once, before step 1", "seconds": probe_seconds, "steps": probe_seconds / step},
            "probe_model (added to a run)": {"when": "a fresh run's first 10 turns with the probes against without "
                                             "(median of 3 pairs)", "seconds": added * step, "steps": added},
            "probe_model (warm)": {"when": "the same, timed again in turns with a step (median of 5)", "seconds": warm,
                                   "steps": warm / warm_step},
            "update_ratio": {"when": "once, after step 100", "seconds": ratio_seconds, "steps": ratio_seconds / step},
            "source_gain": {"when": "every validation", "seconds": gain, "of_validation": gain / validation}}
    for name, times in seconds.items():
        per_call = statistics.median(times)
        rows[name] = {"when": f"every {every[name]} step(s)", "seconds": per_call,
                      "per_step": per_call / every[name] / step}
    print(f"\n{config}, {rt.dtype} on {rt.device}, {torch.get_num_threads()} threads: a training step takes "
          f"{step:.3f} s (median of {steps}); log_interval {cfg['log_interval']}")
    print("| diagnostic | runs | seconds per call | cost |\n|---|---|---:|---:|")
    for name, row in rows.items():
        cost = (f"{row['steps']:.2f} steps" if "steps" in row else f"{row['of_validation']:.1%} of a validation"
                if "of_validation" in row else f"{row['per_step']:.4%} of a step")
        print(f"| {name} | {row['when']} | {row['seconds']:.6f} | {cost} |")
    return {"bench": "diagnostics", "config": config, "dtype": rt.dtype, "device": rt.device, "step_seconds": step,
            "validation_seconds": validation,
            "rows": rows, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    if threads > 0:
        torch.set_num_threads(threads)
    benches = {"decode": bench_decode, "train": bench_train, "loop": bench_loop, "generate": bench_generate,
               "quality": bench_quality, "diagnostics": bench_diagnostics}
    if bench not in benches:
        raise ConfigError(f"bench='{bench}' is not known: use one of {', '.join(benches)}")
    path = out_json or f"bench_{bench}.json"
    if os.path.exists(path) and not overwrite:          # before the bench: it may take half an hour
        raise ConfigError(f"{path} holds an earlier measurement: choose another --out_json, or replace it "
                          "with --overwrite=True")
    result = benches[bench]()
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written to {path}")


if __name__ == "__main__":
    main_guard(main, DataError)
