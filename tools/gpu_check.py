"""
The GPU path checked in four parts: tests/test_cuda.py; the training step against
torch.nn.Transformer and MarianMT in bf16 and fp16 (tools/bench.py --bench=train at the main
config's sizes); the main config trained for 2 minutes (first-epoch and steady tokens/s, validation
times and BLEU); greedy and beam decoding of its test split, cold (the first pass of a fresh
process) and warm (the same pass again in that process). Each part has a time limit (printed at the
start); one that fails, raises or runs out of time is recorded with its error and the others still
run. out_dir/gpu_check.json is rewritten after every part; each part's output is in out_dir/*.log.

    python tools/gpu_check.py --parts=tests --dataset=data/europarl_en_it               # at most 270 s
    python tools/gpu_check.py --parts=bench,train,decode --dataset=data/europarl_en_it  # 80 + 160 + 55 s

Two commands that each fit a 10-minute limit on one H100 with room to spare (--dataset: a folder,
as a GPU machine may have no hub access); the second adds its parts to the first's gpu_check.json
(a part already there is replaced only with --overwrite=True). Leaves out: several GPUs
(test_cuda.py's torchrun test needs two).
"""

import importlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project folder: every part runs there
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402
from data import data_of_checkpoint  # noqa: E402
from decoding import score, translate  # noqa: E402
from runtime import setup  # noqa: E402

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
tests = "tests/test_cuda.py"  # the tests part's pytest files, space-separated
test_workers = 4  # pytest processes for the tests part (with pytest-xdist; 1 = one after another)
parts = "tests,bench,train,decode"  # which parts run, comma-separated
tests_limit = 270.0  # seconds the tests part may take; past its limit a part is stopped and recorded as failed
bench_limit = 80.0  # seconds the step bench may take
train_overhead = 40.0  # seconds the train part may take beyond its `minutes` (start-up, data, last validation)
decode_limit = 55.0  # seconds for the decode part's two fresh processes together
out_dir = "out/gpu_check"  # logs, the training run (out_dir/train) and gpu_check.json
overwrite = False  # may replace parts already in out_dir/gpu_check.json (otherwise a command choosing one is refused)
# -----------------------------------------------------------------------------


def shell(name: str, args: list[str], timeout: float) -> tuple[bool, str]:
    """Run `python ARGS` in the project folder, its output into out_dir/NAME.log: (it succeeded,
    its output). Past `timeout` seconds it is killed with every process it started: pytest's and
    the bench's children would otherwise hold the GPU while the next part is timed."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text = proc.communicate(timeout=max(timeout, 0.001))[0]
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, ok = proc.communicate()[0] + f"\n(stopped after {timeout:.3g} s, the part's time limit)", False
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
        f.write(text)
    return ok, text


def tail(text: str, lines: int = 12) -> str:
    """The end of a command's output, where its error is."""
    return "\n".join(text.strip().splitlines()[-lines:])


def check_tests(limit: float) -> dict:
    """The CUDA tests, one line per test (-v), so that a part stopped at its limit still tells which
    tests passed; in test_workers processes where pytest-xdist is installed (the tests are tiny
    runs that leave the GPU mostly idle, each with seconds of start-up)."""
    workers = ["-n", str(test_workers)] if test_workers > 1 and importable("xdist") else []
    ok, text = shell("tests", ["-m", "pytest", *tests.split(), "-m", "slow or not slow", "-o", "addopts=", "-v",
                               "-p", "no:cacheprovider", *workers], limit)
    outcomes = {}                                       # 'passed' -> {test names}, from lines like
    for line in text.splitlines():                      # "tests/test_cuda.py::test_x[bf16] PASSED [ 5%]"
        outcome, test = re.search(r"\b(PASSED|FAILED|SKIPPED|ERROR)\b", line), re.search(r"::(\S+)", line)
        if outcome and test:
            outcomes.setdefault(outcome[1].lower(), set()).add(test[1])
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    return {"ok": ok, "summary": summary, "counts": {k: len(v) for k, v in outcomes.items()},
            "failed": sorted(outcomes.get("failed", set()) | outcomes.get("error", set())),
            **({} if ok else {"error": tail(text)})}


def check_bench(limit: float) -> dict:
    path = os.path.join(out_dir, "bench_train.json")
    if os.path.exists(path):
        os.remove(path)                                 # a failed bench must not leave an earlier one's figures
    ok, text = shell("bench", ["tools/bench.py", "--bench=train", f"--device={device}", f"--config={config}",
                               "--models=ours,torch,marian", f"--dtypes={dtypes}", f"--steps={bench_steps}",
                               f"--out_json={path}", "--overwrite=True"]
                     + ([f"--dataset={dataset}"] if dataset else []), limit)
    if not ok:
        return {"ok": False, "error": tail(text)}
    with open(path) as f:
        bench = json.load(f)
    return {"ok": True, "notes": bench["notes"],          # the bench leaves MarianMT out where transformers is missing
            "tokens_per_s": {dt: {m: row["tokens_per_s"] for m, row in r["models"].items()}
                             for dt, r in bench["results"].items()}}


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def check_train(limit: float) -> dict:
    run_dir = os.path.join(out_dir, "train")
    plots = importable("matplotlib")                    # without it, plots.png would fail the run at its end
    ok, text = shell("train", ["train.py", config, f"--device={device}", f"--max_minutes={minutes}",
                               f"--out_dir={run_dir}", "--overwrite=True", *([] if plots else ["--plot=False"]),
                               *train_args.split()] + ([f"--dataset={dataset}"] if dataset else []), limit)
    notes = [] if plots else ["matplotlib is not installed: the run drew no plots.png"]
    records = []
    if os.path.exists(os.path.join(run_dir, "log.jsonl")):
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not ok or not steps:
        return {"ok": False, "notes": notes, "error": tail(text) if not ok else "no training step logged"}
    rate = lambda rs: statistics.median(r["tok_per_s"] for r in rs) if rs else float("nan")  # noqa: E731
    return {"ok": True, "notes": notes, "steps": steps[-1]["step"], "epochs": steps[-1]["epoch"],
            "minutes": steps[-1]["minutes"], "first_epoch_tok_per_s": rate([r for r in steps[1:] if r["epoch"] <= 1]),
            "steady_tok_per_s": rate([r for r in steps if r["epoch"] > 1]),
            "eval_seconds": [round(r["seconds"], 1) for r in evals], "val_bleu": [round(r["bleu"], 2) for r in evals]}


def decode_passes(ckpt: str, data_dir: str, dev: str, beam_size: int, batch_size: int, sentences: int,
                  out_json: str) -> None:
    """Decode a checkpoint's test split twice the same way (beam 1: greedy) and write both passes'
    figures to out_json. Run in a fresh process, so that the first pass is cold (no decoding has
    run in the process yet: kernels, the allocator's pools) and the second warm."""
    checkpoint = load_checkpoint(ckpt)
    rt = setup(dev, checkpoint["train_config"]["dtype"])
    model, src_tok, tgt_tok = model_from_checkpoint(checkpoint, verbose=False)
    model.to(rt.device).eval()
    test = data_of_checkpoint(checkpoint, data_dir, verbose=False).splits["test"]
    n = len(test) if sentences <= 0 else min(sentences, len(test))
    passes = []
    for _ in range(2):
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        started = time.time()
        hyps = translate(model, src_tok, tgt_tok, test.src_text[:n], beam=beam_size, batch_size=batch_size,
                         device=rt.device, amp=rt.amp)
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - started
        passes.append({"seconds": seconds, "sentences_per_s": n / seconds,
                       "bleu": score(hyps, test.tgt_text[:n])["bleu"]})
    with open(out_json, "w") as f:
        json.dump({"sentences": n, "dtype": rt.dtype, "passes": passes}, f)


def check_decode(limit: float) -> dict:
    ckpt = os.path.join(out_dir, "train", "best.pt")
    if not os.path.exists(ckpt):
        return {"ok": False, "error": f"no {ckpt}: the train part must run first (in this command or an earlier "
                                      "one with this out_dir)"}
    started, rows, result = time.time(), {}, {}
    for name, b in (("greedy", 1), (f"beam {beam}", beam)):     # beam's cold pass must not follow greedy's passes
        log = "decode_greedy" if b == 1 else f"decode_beam{b}"
        path = os.path.join(out_dir, f"{log}.json")
        spec = dict(ckpt=ckpt, data_dir=dataset, dev=device, beam_size=b, batch_size=decode_batch,
                    sentences=decode_sentences, out_json=path)
        call = "import json, sys; from tools.gpu_check import decode_passes; decode_passes(**json.loads(sys.argv[1]))"
        ok, text = shell(log, ["-c", call, json.dumps(spec)], limit - (time.time() - started))
        if not ok:
            return {"ok": False, "error": f"{name}: {tail(text)}", "decoding": rows, **result}
        with open(path) as f:
            result = json.load(f)
        rows[f"{name}, cold"], rows[f"{name}, warm"] = result.pop("passes")
    return {"ok": True, **result, "decoding": rows}


CHECKS = {"tests": check_tests, "bench": check_bench, "train": check_train, "decode": check_decode}


def limits() -> dict:
    """Seconds each part may take: what one command's parts add up to must fit its time."""
    return {"tests": tests_limit, "bench": bench_limit, "train": 60 * minutes + train_overhead, "decode": decode_limit}


def run_part(name: str, limit: float, gpu: str) -> dict:
    """One part, whatever happens in it: a part that raises is recorded as failed, with its error."""
    started = time.time()
    try:
        result = CHECKS[name](limit)
    except Exception as e:                              # a part's failure must not cost the other parts' figures
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {**result, "seconds": round(time.time() - started, 1), "limit_seconds": limit, "gpu": gpu,
            "torch": torch.__version__}


def earlier_check(path: str, chosen: list[str]) -> dict:
    """What earlier commands wrote to gpu_check.json, which this one adds its parts to. Refused
    before anything runs (the parts take minutes) where it checked another config or dataset, or
    holds a chosen part and overwrite is off."""
    fresh = {"config": config, "dataset": dataset}
    if not os.path.exists(path):
        return fresh
    with open(path) as f:
        results = json.load(f)
    if {k: results.get(k) for k in fresh} != fresh:
        raise ConfigError(f"{path} holds a check of --config={results.get('config')} "
                          f"--dataset='{results.get('dataset')}': run with those, or choose another --out_dir")
    again = [p for p in chosen if p in results]
    if again and not overwrite:
        raise ConfigError(f"{path} already holds the part(s) {', '.join(again)}: choose other --parts, another "
                          "--out_dir, or replace them with --overwrite=True")
    return results


def write_json(path: str, results: dict) -> None:
    """Atomically: a check killed while writing leaves the previous file whole."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def tests_rows(r: dict) -> list[tuple]:
    return [("tests", "result", r["summary"])] if r["ok"] else []    # a failure gets table()'s row


def bench_rows(r: dict) -> list[tuple]:
    rows = []
    for dt, tps in r.get("tokens_per_s", {}).items():
        ours = tps.get("this project, Transformer", float("nan"))
        for m, rate in tps.items():
            rows.append((f"step bench, {dt}", m, f"{rate:,.0f} target tok/s, ours {ours / rate:.2f}x"))
    return rows


def train_rows(r: dict) -> list[tuple]:
    if not r["ok"]:
        return []
    return [(config, "steps, epochs, minutes", f"{r['steps']:,}, {r['epochs']:.2f}, {r['minutes']:.2f}"),
            (config, "target tok/s, first epoch / later", f"{r['first_epoch_tok_per_s']:,.0f} / "
                                                          f"{r['steady_tok_per_s']:,.0f}"),
            (config, "validation seconds", ", ".join(map(str, r["eval_seconds"]))),
            (config, "validation BLEU (greedy, cased)", ", ".join(map(str, r["val_bleu"]))),
            (config, "whole run, seconds", f"{r['seconds']:.0f}")]


def decode_rows(r: dict) -> list[tuple]:
    return [(f"decoding {r['sentences']} test sentences", name,
             f"{d['sentences_per_s']:,.0f} sentences/s ({d['seconds']:.1f} s), BLEU {d['bleu']:.2f}")
            for name, d in r.get("decoding", {}).items()]


def table(results: dict) -> list[str]:
    """The check's figures as markdown table rows: | part | figure | value |, with a row for each
    note and, for a failed part, the last line of its error."""
    rows = []
    for part, part_rows in (("tests", tests_rows), ("bench", bench_rows), ("train", train_rows),
                            ("decode", decode_rows)):
        r = results.get(part)
        if r is None:
            continue
        rows += part_rows(r) + [(part, "note", note) for note in r.get("notes", [])]
        if not r["ok"]:
            rows.append((part, "failed", (r.get("error", "").strip() or "no output").splitlines()[-1]))
    return [f"| {a} | {b} | {c} |" for a, b, c in rows]


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    if not chosen or not set(chosen) <= set(CHECKS):
        raise ConfigError(f"parts='{parts}': choose from {', '.join(CHECKS)}")
    path = os.path.join(out_dir, "gpu_check.json")
    results = earlier_check(path, chosen)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU here: this script checks the GPU path (--device=cpu only tries the script)")
    os.makedirs(out_dir, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    limit = {p: s for p, s in limits().items() if p in chosen}
    print("time limits: " + ", ".join(f"{p} {s:.0f} s" for p, s in limit.items())
          + f"; {sum(limit.values()):.0f} s in all", flush=True)
    for name in chosen:
        print(f"== {name}", flush=True)
        results[name] = run_part(name, limit[name], gpu)
        write_json(path, results)
        for note in results[name].get("notes", []):
            print(f"note: {note}")
        print(json.dumps(results[name])[:400], flush=True)
    gpus = sorted({r.get("gpu", "?") for p, r in results.items() if p in CHECKS})
    print(f"\n{', '.join(gpus)}, PyTorch {torch.__version__}\n| part | figure | value |\n|---|---|---|")
    print("\n".join(table(results)))
    print(f"written to {path}; each part's output in {out_dir}/*.log")


if __name__ == "__main__":
    main_guard(main)
