"""
Break it on purpose: the classic seq2seq bugs, each put into one short toy run from outside (a
function, method or class of the library replaced in that run's process only: no switch in the
library), and the diagnostic in train.py's log that names it. Each run is a process of its own,
one after the other; the gallery ends with one table (the bug, what a learner would see, the
warning that named it quoted from the log, the seconds) and a figure of the runs side by side
(tools/runs.py). It exits with 1 when a bug goes unnamed or the clean run is flagged.

    python tools/bugs.py                                  # all 13 runs, ~2 minutes on a 2-core CPU
    python tools/bugs.py --bugs=clean,no_causal_mask --out_dir=out/bugs --figure=docs/bugs.png

Leaves out: bugs of the data pipeline (tokenizers, cleaning), of beam search, of several processes.
"""

import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                     # tools/runs.py
import torch  # noqa: E402

import batching  # noqa: E402
import decoding  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402
from model_transformer import MultiHeadAttention, Transformer  # noqa: E402
from runs import plot_runs, read_run  # noqa: E402

bugs = ""  # the runs to make, comma-separated names (default: all, the clean one first); -h lists them
out_dir = "out/bugs"  # one run folder per bug in here, its printed log beside it (NAME.txt), and the data cache
figure = ""  # the figure of the runs side by side (default: out_dir/bugs.png)

# every run: a tiny Transformer on the toy task (tests/helpers.py's TINY), 300 steps, validation
# on 50 sentences every 100; one thread (these models gain nothing from a second one)
BASE = ["--dataset=toy:reverse", "--tokenizer=char", "--tie_embeddings=none", "--d_model=32", "--n_head=2",
        "--n_enc_layer=2", "--n_dec_layer=2", "--d_ff=64", "--dropout=0.0", "--batch_tokens=1500",
        "--learning_rate=3e-3", "--warmup_frac=0.1", "--max_iters=300", "--log_interval=25", "--eval_interval=100",
        "--eval_sentences=50", "--dtype=float32", "--plot=False", "--overwrite=True"]


# -----------------------------------------------------------------------------
# the bugs, each a function that puts it into this process (before train.main runs)

def no_causal_mask() -> None:
    """Decoder self-attention sees every position, the future too."""
    real = MultiHeadAttention.attend
    MultiHeadAttention.attend = lambda self, q, k, v, mask=None, causal=False: real(self, q, k, v, mask, False)


def target_not_shifted() -> None:
    """collate gives tgt_in = tgt_out: the decoder reads the word it must predict."""
    real = batching.collate

    def collate(*args, **kwargs):
        src, tgt_in, tgt_out = real(*args, **kwargs)
        return src, tgt_out.clone(), tgt_out
    batching.collate = decoding.collate = collate          # training batches and the validation loss


def loss_over_padding() -> None:
    """The loss leaves nothing out: padded target positions are predicted and averaged too."""
    real = train.sequence_loss
    train.sequence_loss = lambda logits, tgt_out, pad_id, smoothing: real(logits, tgt_out, -1, smoothing)


def softmax_before_loss() -> None:
    """The cross-entropy gets probabilities instead of logits (it takes a softmax of its own)."""
    real = train.sequence_loss
    train.sequence_loss = lambda logits, tgt_out, pad_id, smoothing: real(logits.softmax(-1), tgt_out, pad_id,
                                                                          smoothing)


def no_padding_mask() -> None:
    """The encoder's padding mask is missing: attention reads the padding after each source sentence."""
    def encode(self, src):
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, None)
        return self.enc_norm(x), None                     # cross-attention gets no mask either
    Transformer.encode = encode


def no_zero_grad() -> None:
    """optimizer.zero_grad() forgotten: each backward() adds to the gradients of every earlier step."""
    torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: None


def init_too_large() -> None:
    """Every weight initialised 10x too large."""
    real = Transformer._init_weights

    def init(self, module):
        real(self, module)
        for p in module.parameters(recurse=False):
            p.data.mul_(10)
    Transformer._init_weights = init


def eval_forgotten() -> None:
    """Decoding and validation forget model.eval(): dropout stays on while translating."""
    def forgetful(fn):
        def wrapped(model, *args, **kwargs):
            outermost = "eval" not in vars(model)         # evaluate calls translate_nbest: shadow once
            if outermost:
                model.eval = lambda: model                # this call's model.eval() does nothing
            try:
                return fn(model, *args, **kwargs)
            finally:
                if outermost:
                    del model.eval
        return wrapped
    decoding.translate_nbest = forgetful(decoding.translate_nbest)
    decoding.evaluate = train.evaluate = forgetful(decoding.evaluate)


def no_attention_scale() -> None:
    """Attention scores Q K^T without the 1 / sqrt(Dh)."""
    real = MultiHeadAttention.attend
    MultiHeadAttention.attend = lambda self, q, k, v, mask=None, causal=False: real(
        self, q * math.sqrt(q.shape[-1]), k, v, mask, causal)    # attend divides by sqrt(Dh): net, no scale


def overfit_reshuffled() -> None:
    """Overfit mode's batch is drawn anew every epoch (shuffled) instead of being the same one."""
    def of_epoch(self, epoch):
        if epoch != self.epoch:
            sp = self.data.splits["train"]
            self.batches = batching.make_batches(sp.src_lens, sp.tgt_lens, self.batch_tokens, seed=self.seed,
                                                 epoch=epoch)[:self.overfit]
            self.epoch = epoch
        return self.batches
    batching.TrainBatches.of_epoch = of_epoch


@dataclass
class Bug:
    name: str
    seen: str                           # what a learner would see
    named_by: str                       # the warning that should name it ('' = none: the clean run)
    inject: Callable | None = None      # puts the bug into the run's process
    knobs: tuple = ()                   # train.py arguments of this run, after BASE


GALLERY = [
    Bug("clean", "loss falls, BLEU climbs", ""),
    Bug("no_causal_mask", "loss falls faster than clean's, greedy output one digit repeated (8 8 8 8)", "causal_mask",
        no_causal_mask),
    Bug("target_not_shifted", "loss at its floor by step 100, greedy output 8888..., BLEU 0", "teacher_forcing_leak",
        target_not_shifted),
    Bug("loss_over_padding", "nothing here (0.2% padding); with more padding, a loss lowered by easy pad targets",
        "padding_in_loss", loss_over_padding),
    Bug("softmax_before_loss", "loss stuck 0.3-0.4 nats below ln(V), gradient norm under 0.1", "loss_stuck",
        softmax_before_loss),
    Bug("no_padding_mask", "training loss as clean's, BLEU a third of it: a sentence translates differently in a batch",
        "padding_mask", no_padding_mask),
    Bug("lr_too_high", "loss stalls at ~1.5, the level of a model that ignores the source; BLEU ~0", "weights_grow",
        knobs=("--learning_rate=6e-2",)),
    Bug("gru_no_clip", "GRU: loss stalls ~1 nat below ln(V), the encoder's gradient norm 0.00, BLEU 0", "weights_grow",
        knobs=("--arch=rnn", "--emb_dim=64", "--hidden_size=128", "--embed_scale=False", "--learning_rate=1e-1",
               "--grad_clip=0")),
    Bug("no_zero_grad", "loss falls slower and stalls, BLEU ~3", "gradients_kept", no_zero_grad),
    Bug("init_too_large", "step-0 loss 205 (ln(V) = 2.7), gradient norms in the hundreds, BLEU 0", "initial_loss",
        init_too_large),
    Bug("eval_forgotten", "BLEU low and falling, translations differ from one decoding to the next",
        "dropout_in_decoding",
        eval_forgotten, ("--dropout=0.1",)),
    Bug("no_attention_scale", "trains, but slower: attention starts saturated, little gradient through it",
        "attention_scale", no_attention_scale),
    Bug("overfit_reshuffled", "overfit mode's loss does not fall near zero (0.45 at step 300)",
        "overfit_batches_change", overfit_reshuffled, ("--overfit_batches=1",)),
]
BY_NAME = {bug.name: bug for bug in GALLERY}


# -----------------------------------------------------------------------------
# running them

def run_bug(name: str, run_dir: str, cache_dir: str, printed: str) -> None:
    """In a fresh process: put the bug in, then train.main on BASE + the bug's knobs, its log to `printed`."""
    sys.stdout = sys.stderr = open(printed, "w", buffering=1)       # line by line, a traceback too
    torch.set_num_threads(1)
    bug = BY_NAME[name]
    if bug.inject is not None:
        bug.inject()
    train.main([*BASE, *bug.knobs, f"--out_dir={run_dir}", f"--cache_dir={cache_dir}"])


def run_all(names: list[str], root: str) -> list[dict]:
    """Run each named bug in a process of its own, one after the other; their outcomes."""
    context = multiprocessing.get_context("spawn")          # a fresh interpreter: no bug leaks into the next
    outcomes = []
    for name in names:
        run_dir, printed = os.path.join(root, name), os.path.join(root, f"{name}.txt")
        started = time.time()
        process = context.Process(target=run_bug, args=(name, run_dir, os.path.join(root, "cache"), printed))
        process.start()
        process.join()
        outcomes.append(outcome(BY_NAME[name], run_dir, process.exitcode, time.time() - started))
        print(verdict_line(outcomes[-1]), flush=True)
    return outcomes


def outcome(bug: Bug, run_dir: str, exit_code: int, seconds: float) -> dict:
    """What one run showed: the warnings of its log.jsonl by name (the first of each), its last loss
    and best BLEU, whether its diagnostic named it (the clean run: whether nothing fired)."""
    path = os.path.join(run_dir, "log.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    warnings = {}
    for r in records:
        if r["kind"] == "warning":
            warnings.setdefault(r["name"], r["text"])
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    bleus = [r["bleu"] for r in records if r["kind"] == "eval"]
    named = bug.named_by in warnings if bug.named_by else not warnings
    return dict(bug=bug, warnings=warnings, exit_code=exit_code, seconds=seconds, named=named, run_dir=run_dir,
                loss=losses[-1] if losses else math.nan, bleu=max(bleus) if bleus else math.nan)


def verdict_line(o: dict) -> str:
    bug, fired = o["bug"], ", ".join(o["warnings"]) or "nothing"
    if not bug.named_by:
        state = "clean, nothing fired" if o["named"] else f"FLAGGED: {fired}"
    else:
        state = f"named by {bug.named_by}" if o["named"] else f"NOT NAMED (fired: {fired})"
    code = f", exit code {o['exit_code']}" if o["exit_code"] else ""
    return f"{bug.name:<20} {o['seconds']:5.1f} s  {state}{code}"


def quote(text: str, limit: int = 110) -> str:
    """A warning's first sentence, at most `limit` characters."""
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def table(outcomes: list[dict]) -> list[str]:
    """The gallery as a markdown table, one row per run."""
    lines = ["| bug | what a learner sees | last loss, best BLEU | named by: its log line | also fired | s |",
             "|---|---|---|---|---|---:|"]
    for o in outcomes:
        bug = o["bug"]
        if not bug.named_by:
            said = "nothing fired" if o["named"] else "**flagged**"
        elif o["named"]:
            said = f"`{bug.named_by}`: \"warning: {quote(o['warnings'][bug.named_by])}\""
        else:
            said = f"**not named** (expected `{bug.named_by}`)"
        also = ", ".join(f"`{n}`" for n in o["warnings"] if n != bug.named_by) or "-"
        lines.append(f"| {bug.name} | {bug.seen} | {o['loss']:.2f}, {o['bleu']:.1f} | {said} | {also} | "
                     f"{o['seconds']:.0f} |")
    return lines


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__.strip() + "\n\nthe bugs: " + ", ".join(BY_NAME) + "\n")
    configure(globals(), sys.argv[1:], doc_files=(__file__,))
    names = [n.strip() for n in bugs.split(",") if n.strip()] if bugs else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"--bugs names {', '.join(unknown)}, which the gallery does not have: use some of "
                          + ", ".join(BY_NAME))
    os.makedirs(out_dir, exist_ok=True)
    started = time.time()
    outcomes = run_all(names, out_dir)
    print("\n" + "\n".join(table(outcomes)) + "\n")
    picture = plot_runs([read_run(o["run_dir"], o["bug"].name) for o in outcomes
                         if os.path.exists(os.path.join(o["run_dir"], "log.jsonl"))],
                        figure or os.path.join(out_dir, "bugs.png"), title="tools/bugs.py: the gallery's runs")
    failed = [o["bug"].name for o in outcomes if not o["named"]]
    print(f"{len(outcomes)} runs in {time.time() - started:.0f} s; figure {picture}")
    if failed:
        print(f"not as expected: {', '.join(failed)} (the printed log of each: {out_dir}/NAME.txt)")
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main)
