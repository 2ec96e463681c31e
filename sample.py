"""
Translate with a trained (or pruned) checkpoint; everything comes from the checkpoint file.

    python sample.py --ckpt=out/multi30k/best.pt --text="A man rides a bike."
    echo "A dog runs." | python sample.py --ckpt=out/multi30k/best.pt
    python sample.py --ckpt=out/multi30k/best.pt --input=sentences.en --ref=sentences.de
    python sample.py --ckpt=out/multi30k/best.pt --split=test --beam=5 --alpha=0.6   # BLEU/chrF on test
    python sample.py --ckpt=out/multi30k/best.pt --text="A dog runs." --plot_attention=attn.png

One translation per input line on stdout, in input order (--scores: 'score<TAB>translation';
--nbest=N: N lines 'line<TAB>score<TAB>translation' per input); BLEU (cased and lower-cased),
chrF and their signatures on stderr. Leaves out: sampling with temperature.
"""

import os
import sys
import time

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import ConfigError, configure, main_guard
from data import DataConfig, DataError, data_of_checkpoint
from decoding import beam_search, greedy, max_target_len, score, strip_special, translate_nbest
from runtime import setup

# -----------------------------------------------------------------------------
ckpt = "out/transformer_en_it/best.pt"  # checkpoint written by train.py or prune.py
text = ""  # one sentence to translate (otherwise --input, --split, or stdin)
input = ""  # file with one source sentence per line
ref = ""  # file with one reference translation per line: print BLEU and chrF
split = ""  # 'validation' or 'test': translate that split of the checkpoint's dataset and score it
dataset = ""  # with --split: a local folder to read instead of the checkpoint's dataset (no network)
beam = 1  # beam size; 1 = greedy decoding
alpha = 0.6  # beam search length penalty ((5 + len) / 6) ** alpha; 0 = rank by log-probability alone
nbest = 1  # print this many translations per input (needs beam >= nbest)
scores = False  # print each translation's score (sum of token log-probabilities)
plot_attention = ""  # PNG path: cross-attention of the first input sentence, one panel per layer and head
batch_size = 64  # sentences decoded together
max_src_len = 256  # source tokens kept per sentence; longer inputs are truncated with a warning
max_len_a = 1.5  # outputs stop after max_len_a * source tokens + max_len_b tokens
max_len_b = 10  # (a model that never emits <eos> cannot run forever)
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


def write_attention_plot(model, src_tok, tgt_tok, text: str, path: str, device: str, beam: int = 1,
                         alpha: float = 0.6, max_src_len: int = 256, max_len_a: float = 1.5, max_len_b: int = 10) -> str:
    """Decode one sentence (greedy, or beam search with beam > 1) and draw the decoder's attention
    over the source while it produced that output: one panel per layer and head (Transformer),
    one panel (RNN with attention). Rows are the generated pieces, columns the source pieces.
    Returns the translation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src_ids = src_tok.encode(text)[:max_src_len] + [src_tok.eos_id]
    src, limit = torch.tensor([src_ids], device=device), max_target_len(len(src_ids), max_len_a, max_len_b)
    if beam > 1:
        ids = beam_search(model, src, tgt_tok.bos_id, tgt_tok.eos_id, limit, beam, alpha)[0][0][0]
    else:
        ids = strip_special(greedy(model, src, tgt_tok.bos_id, tgt_tok.eos_id, tgt_tok.pad_id,
                                   limit)[0][0].tolist(), tgt_tok.eos_id)
    out_ids = ids + [tgt_tok.eos_id]
    maps = model.attention_maps(src, torch.tensor([[tgt_tok.bos_id] + ids], device=device))
    if not maps:
        raise ConfigError("--plot_attention: this model has no attention over the source to draw (a GRU with "
                          "attention='none', or a Transformer whose cross-attention heads were all pruned)")
    cols = min(len(maps), 8)
    rows = -(-len(maps) // cols)
    S, T = len(src_ids), len(out_ids)
    cell = 0.22 + 0.05 * max(0, 8 - cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4, cols * S * cell) + 1, rows * T * cell + 1.5),
                             squeeze=False)
    for ax, (title, weights) in zip(axes.flat, maps.items()):
        ax.imshow(weights[0].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(S), [src_tok.piece(i) for i in src_ids], rotation=90, fontsize=6)
        ax.set_yticks(range(T), [tgt_tok.piece(i) for i in out_ids], fontsize=6)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    fig.suptitle(f"{text}\n-> {tgt_tok.decode(ids)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return tgt_tok.decode(ids)


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    if beam < 1 or not 1 <= nbest <= beam:
        raise ConfigError(f"beam={beam}, nbest={nbest}: need beam >= 1 and 1 <= nbest <= beam")
    checkpoint = load_checkpoint(ckpt)
    model, src_tok, tgt_tok = model_from_checkpoint(checkpoint)
    rt = setup(device, dtype)
    dev, amp = rt.device, rt.amp
    model.to(dev).eval()
    log = lambda msg: print(msg, file=sys.stderr)   # noqa: E731 - stdout carries only translations

    # a model trained on lower-cased text (data knob `lowercase`) reads and is scored on lower-cased text
    lowercased = DataConfig.of(checkpoint["data_config"]).lowercase
    prepare = (lambda lines: [line.lower() for line in lines]) if lowercased else (lambda lines: lines)

    def run(lines: list[str]) -> list[list[tuple[str, float]]]:
        return translate_nbest(model, src_tok, tgt_tok, prepare(lines), beam=beam, alpha=alpha, nbest=nbest,
                               batch_size=batch_size, max_src_len=max_src_len, max_len_a=max_len_a,
                               max_len_b=max_len_b, device=dev, amp=amp, warn=log)

    def write(results: list[list[tuple[str, float]]], first_line: int = 1) -> None:
        for n, found in enumerate(results, start=first_line):
            for text_out, logprob in found:
                if nbest > 1:
                    print(f"{n}\t{logprob:.4f}\t{text_out}")
                else:
                    print(f"{logprob:.4f}\t{text_out}" if scores else text_out)

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
        for n, line in enumerate(sys.stdin, start=1):
            write(run([line.rstrip("\n")]), first_line=n)
            sys.stdout.flush()
        return
    else:
        sources = sys.stdin.read().splitlines()
    if ref:
        references = prepare(read_lines(ref, "reference"))
        if len(references) != len(sources):
            raise ConfigError(f"--ref has {len(references)} lines but there are {len(sources)} inputs")

    if plot_attention:
        if not sources or not sources[0].strip():
            raise ConfigError("--plot_attention needs a sentence: give --text, --input, --split or stdin")
        write_attention_plot(model, src_tok, tgt_tok, prepare(sources[:1])[0], plot_attention, dev, beam, alpha,
                             max_src_len, max_len_a, max_len_b)
        log(f"attention of the first sentence written to {plot_attention}")

    t0 = time.time()
    results = run(sources)
    seconds = time.time() - t0
    write(results)
    method = f"beam {beam}, alpha {alpha}" if beam > 1 else "greedy"
    log(f"{len(sources)} sentences in {seconds:.1f}s ({len(sources) / max(seconds, 1e-9):.1f} sentences/s, {method})")
    hyps = [found[0][0] for found in results]
    if references is not None:
        s = score(hyps, references)
        for name in ("bleu", "bleu_lc", "chrf"):
            log(f"{s[f'{name}_str']}\n  signature: {s[f'{name}_signature']}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    try:
        main_guard(main, DataError)
    except BrokenPipeError:           # `python sample.py ... | head` closed the pipe: not an error
        os._exit(0)
