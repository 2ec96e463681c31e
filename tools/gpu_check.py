"""
The GPU path checked in one command, sized for about 8 minutes on one H100/H200:
tests/test_cuda.py; the training step against torch.nn.Transformer and MarianMT in bf16 and
fp16 (tools/bench.py --bench=train at the main config's sizes); the main config trained for 2
minutes (first-epoch and steady tokens/s, validation times and BLEU); greedy and beam decoding of
its test split, cold (the first pass in this process) and warm (the same pass again). One table
at the end; every part's output in out_dir, the figures in out_dir/gpu_check.json.

    python tools/gpu_check.py --dataset=data/europarl_en_it      # a folder: a GPU machine may have no hub access

A part that fails is reported and the others still run. Leaves out: several GPUs (test_cuda.py's
torchrun test needs two).
"""

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
import torch  # noqa: E402

from checkpoint import data_of_checkpoint, load_checkpoint, model_from_checkpoint  # noqa: E402
from common import setup  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402
from decoding import score, translate  # noqa: E402

# -----------------------------------------------------------------------------
dataset = ""  # a local folder with train.jsonl for the main config ('' = the config's own dataset)
config = "config/transformer_en_it.py"  # the main job
minutes = 2.0  # its training budget (train.py's max_minutes)
device = "cuda"  # where everything runs ('cpu' only to try the script itself)
dtypes = "bfloat16,float16"  # the step bench's precisions
bench_steps = 20  # the step bench's timed steps per model and repeat
decode_batch = 128  # sentences per batch when decoding the test split
decode_sentences = 0  # the test split's first N sentences are decoded (0 = all)
beam = 5  # the beam size measured beside greedy
train_args = ""  # more train.py arguments for the main config, space-separated (e.g. --batch_tokens=16000)
parts = "tests,bench,train,decode"  # which parts run, comma-separated
out_dir = "out/gpu_check"  # logs, the training run (out_dir/train) and gpu_check.json
overwrite = False  # may replace an earlier check in out_dir (otherwise it is refused before anything runs)
# -----------------------------------------------------------------------------


def shell(name: str, args: list[str], timeout: float) -> tuple[bool, str, float]:
    """Run `python ARGS` in the project folder, its output into out_dir/NAME.log: (it succeeded,
    its output, seconds)."""
    started = time.time()
    try:
        out = subprocess.run([sys.executable, *args], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             capture_output=True, text=True, timeout=timeout)
        ok, text = out.returncode == 0, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        ok, text = False, f"{e.stdout or ''}{e.stderr or ''}\n(stopped after {timeout:.0f} s)"
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
        f.write(text)
    return ok, text, time.time() - started


def check_tests() -> dict:
    ok, text, seconds = shell("tests", ["-m", "pytest", "tests/test_cuda.py", "-m", "slow or not slow", "-o",
                                        "addopts=", "-q", "-p", "no:cacheprovider"], 300)
    return {"ok": ok, "summary": text.strip().splitlines()[-1] if text.strip() else "", "seconds": seconds}


def check_bench() -> dict:
    path = os.path.join(out_dir, "bench_train.json")
    ok, _, seconds = shell("bench", ["tools/bench.py", "--bench=train", f"--device={device}", f"--config={config}",
                                     "--models=ours,torch,marian", f"--dtypes={dtypes}", f"--steps={bench_steps}",
                                     f"--out_json={path}", "--overwrite=True"]
                           + ([f"--dataset={dataset}"] if dataset else []), 300)
    if not ok:
        return {"ok": False, "seconds": seconds}
    with open(path) as f:
        results = json.load(f)["results"]
    return {"ok": True, "seconds": seconds, "tokens_per_s": {dt: {m: row["tokens_per_s"] for m, row in r["models"].items()}
                                                          for dt, r in results.items()}}


def check_train() -> dict:
    run_dir = os.path.join(out_dir, "train")
    ok, _, seconds = shell("train", ["train.py", config, f"--device={device}", f"--max_minutes={minutes}",
                                     f"--out_dir={run_dir}", "--overwrite=True", *train_args.split()]
                           + ([f"--dataset={dataset}"] if dataset else []), 60 * minutes + 240)
    records = []
    if os.path.exists(os.path.join(run_dir, "log.jsonl")):
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not ok or not steps:
        return {"ok": False, "seconds": seconds}
    rate = lambda rs: statistics.median(r["tok_per_s"] for r in rs) if rs else float("nan")  # noqa: E731
    return {"ok": True, "seconds": seconds, "steps": steps[-1]["step"], "epochs": steps[-1]["epoch"],
            "minutes": steps[-1]["minutes"], "first_epoch_tok_per_s": rate([r for r in steps[1:] if r["epoch"] <= 1]),
            "steady_tok_per_s": rate([r for r in steps if r["epoch"] > 1]),
            "eval_seconds": [round(r["seconds"], 1) for r in evals], "val_bleu": [round(r["bleu"], 2) for r in evals]}


def check_decode() -> dict:
    path = os.path.join(out_dir, "train", "best.pt")
    if not os.path.exists(path):
        return {"ok": False, "why": f"no {path}: the train part must run first"}
    checkpoint = load_checkpoint(path)
    rt = setup(device, checkpoint["train_config"]["dtype"])
    model, src_tok, tgt_tok = model_from_checkpoint(checkpoint, verbose=False)
    model.to(rt.device).eval()
    test = data_of_checkpoint(checkpoint, dataset, verbose=False).splits["test"]
    n = len(test) if decode_sentences <= 0 else min(decode_sentences, len(test))
    sources, references = test.src_text[:n], test.tgt_text[:n]
    rows = {}
    for name, b in (("greedy", 1), (f"beam {beam}", beam)):
        for when in ("cold", "warm"):                  # cold: this process has not decoded this way yet
            if rt.device_type == "cuda":
                torch.cuda.synchronize()
            started = time.time()
            hyps = translate(model, src_tok, tgt_tok, sources, beam=b, batch_size=decode_batch,
                             device=rt.device, amp=rt.amp)
            if rt.device_type == "cuda":
                torch.cuda.synchronize()
            seconds = time.time() - started
            rows[f"{name}, {when}"] = {"seconds": seconds, "sentences_per_s": len(hyps) / seconds,
                                       "bleu": score(hyps, references)["bleu"]}
    return {"ok": True, "sentences": n, "dtype": rt.dtype, "decoding": rows}


CHECKS = {"tests": check_tests, "bench": check_bench, "train": check_train, "decode": check_decode}


def table(results: dict) -> list[str]:
    """The check's figures as markdown table rows: | part | figure | value |."""
    rows = []
    if "tests" in results:
        rows.append(("tests/test_cuda.py", "result", results["tests"]["summary"] or "failed"))
    if "bench" in results:
        for dt, tps in results["bench"].get("tokens_per_s", {"(failed)": {}}).items():
            ours = tps.get("this project, Transformer", float("nan"))
            for m, rate in tps.items():
                rows.append((f"step bench, {dt}", m, f"{rate:,.0f} target tok/s, ours {ours / rate:.2f}x"))
    if "train" in results:
        r = results["train"]
        if r["ok"]:
            rows += [(config, "steps, epochs, minutes", f"{r['steps']:,}, {r['epochs']:.2f}, {r['minutes']:.2f}"),
                     (config, "target tok/s, first epoch / later", f"{r['first_epoch_tok_per_s']:,.0f} / "
                                                                   f"{r['steady_tok_per_s']:,.0f}"),
                     (config, "validation seconds", ", ".join(map(str, r["eval_seconds"]))),
                     (config, "validation BLEU (greedy, cased)", ", ".join(map(str, r["val_bleu"]))),
                     (config, "whole run, seconds", f"{r['seconds']:.0f}")]
        else:
            rows.append((config, "training", "failed"))
    if "decode" in results:
        r = results["decode"]
        for name, d in r.get("decoding", {}).items():
            rows.append((f"decoding {r['sentences']} test sentences", name,
                         f"{d['sentences_per_s']:,.0f} sentences/s ({d['seconds']:.1f} s), BLEU {d['bleu']:.2f}"))
        if not r["ok"]:
            rows.append(("decoding", "failed", r["why"]))
    return [f"| {a} | {b} | {c} |" for a, b, c in rows]



def main() -> None:
    configure(globals(), doc_files=(__file__,))
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    if not chosen or not set(chosen) <= set(CHECKS):
        raise ConfigError(f"parts='{parts}': choose from {', '.join(CHECKS)}")
    path = os.path.join(out_dir, "gpu_check.json")
    if os.path.exists(path) and not overwrite:            # before the check: it takes minutes
        raise ConfigError(f"{path} holds an earlier check: choose another --out_dir, or replace it with --overwrite=True")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU here: this script checks the GPU path (--device=cpu only tries the script)")
    os.makedirs(out_dir, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    results = {"gpu": gpu, "torch": torch.__version__, "config": config, "dataset": dataset}
    for name in chosen:
        print(f"== {name}", flush=True)
        results[name] = CHECKS[name]()
        print(json.dumps(results[name])[:400], flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{gpu}, PyTorch {torch.__version__}\n| part | figure | value |\n|---|---|---|")
    print("\n".join(table(results)))
    print(f"written to {path}; each part's output in {out_dir}/*.log")


if __name__ == "__main__":
    main_guard(main)
