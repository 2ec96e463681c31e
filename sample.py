"""
Translate with a trained (or pruned) checkpoint; everything comes from the checkpoint file.

    python sample.py --ckpt=out/multi30k/best.pt --text="A man rides a bike."
    echo "A dog runs." | python sample.py --ckpt=out/multi30k/best.pt
    python sample.py --ckpt=out/multi30k/best.pt --input=sentences.en --ref=sentences.de
    python sample.py --ckpt=out/multi30k/best.pt --split=test      # BLEU/chrF on the data's test split

One translation per input line on stdout, in input order; scores and messages on stderr.
Decoding is greedy with the model's cache (decoding.py). Leaves out: beam search (coming with
its own issue), sampling.
"""

import os
import sys
import time

import torch

from configurator import ConfigError, configure, main_guard
from data import DataError
from decoding import score, translate
from checkpoint import data_of_checkpoint, load_checkpoint, model_from_checkpoint
from train import setup_device

# -----------------------------------------------------------------------------
ckpt = "out/transformer_en_it/best.pt"  # checkpoint written by train.py or prune.py
text = ""  # one sentence to translate (otherwise --input, --split, or stdin)
input = ""  # file with one source sentence per line
ref = ""  # file with one reference translation per line: print BLEU and chrF
split = ""  # 'validation' or 'test': translate that split of the checkpoint's dataset and score it
dataset = ""  # with --split: a local folder to read instead of the checkpoint's dataset (no network)
batch_size = 64  # sentences decoded together
max_src_len = 256  # source tokens kept per sentence; longer inputs are truncated with a warning
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'bfloat16', 'float16', 'float32'
# -----------------------------------------------------------------------------


def read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {what} file '{path}': {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} file '{path}' is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    checkpoint = load_checkpoint(ckpt)
    model, src_tok, tgt_tok = model_from_checkpoint(checkpoint)
    dev, amp, _, _ = setup_device(device, dtype)
    model.to(dev).eval()
    log = lambda msg: print(msg, file=sys.stderr)   # noqa: E731 - stdout carries only translations

    references = None
    if split:
        data = data_of_checkpoint(checkpoint, dataset, verbose=False)
        if split not in data.splits:
            raise ConfigError(f"split='{split}' is not known: use one of {', '.join(data.splits)}")
        sources, references = data.splits[split].src_text, data.splits[split].tgt_text
    elif text:
        sources = [text]
    elif input:
        sources = read_lines(input, "input")
    elif sys.stdin.isatty():            # interactive: translate each line as it is typed
        log(f"translating {checkpoint['data_config']['src_lang']} -> {checkpoint['data_config']['tgt_lang']}; "
            "one sentence per line, Ctrl-D to end")
        for line in sys.stdin:
            print(translate(model, src_tok, tgt_tok, [line.rstrip("\n")], max_src_len=max_src_len,
                            device=dev, amp=amp, warn=log)[0], flush=True)
        return
    else:
        sources = sys.stdin.read().splitlines()
    if ref:
        references = read_lines(ref, "reference")
        if len(references) != len(sources):
            raise ConfigError(f"--ref has {len(references)} lines but there are {len(sources)} inputs")

    t0 = time.time()
    hyps = translate(model, src_tok, tgt_tok, sources, batch_size=batch_size, max_src_len=max_src_len,
                     device=dev, amp=amp, warn=log)
    seconds = time.time() - t0
    for h in hyps:
        print(h)
    log(f"{len(sources)} sentences in {seconds:.1f}s ({len(sources) / max(seconds, 1e-9):.1f} sentences/s, greedy)")
    if references is not None:
        s = score(hyps, references)
        log(f"{s['bleu_str']}\n  signature: {s['bleu_signature']}\n{s['chrf_str']}\n  signature: {s['chrf_signature']}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    try:
        main_guard(main, DataError)
    except BrokenPipeError:           # `python sample.py ... | head` closed the pipe: not an error
        os._exit(0)
