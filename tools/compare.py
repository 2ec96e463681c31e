"""
Is one system's BLEU different from another's on the same sentences, or could the difference
be luck? Paired bootstrap resampling (Koehn 2004), as sacreBLEU implements it.

    python tools/compare.py --ckpt=out/multi30k/avg.pt --split=test --compare=out/multi30k/best.pt
    python tools/compare.py --ckpt=out/multi30k/best.pt --split=test --beam=5 --compare=baseline.txt
    python tools/compare.py --ckpt=A.pt --input=sentences.en --ref=sentences.de --compare=B.pt

--ckpt translates the sources (a split of its data, or --input with --ref); --compare is the
baseline: another checkpoint (.pt), which translates the same sources the same way, or a file
of its translations, one per line. Prints both cased BLEU scores, the difference and its p-value.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
from sacrebleu.metrics import BLEU  # noqa: E402
from sacrebleu.significance import PairedTest  # noqa: E402

from checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402
from data import DataConfig, DataError, data_of_checkpoint  # noqa: E402
from decoding import translate  # noqa: E402
from runtime import setup  # noqa: E402
from sample import read_lines  # noqa: E402

ckpt = "out/multi30k/best.pt"  # the system: a checkpoint written by train.py or prune.py
compare = ""  # the baseline: a checkpoint (.pt) or a file with its translations, one per line
split = ""  # 'validation' or 'test': that split of the checkpoint's dataset, with its references
dataset = ""  # with --split: a local folder to read instead of the checkpoint's dataset (no network)
input = ""  # instead of --split: a file with one source sentence per line ...
ref = ""  # ... and one with their reference translations
beam = 1  # beam size of both checkpoints' translations; 1 = greedy
alpha = 0.6  # beam search length penalty
samples = 1000  # bootstrap resamples
device = "auto"  # 'auto', 'cpu', 'cuda'
dtype = "auto"  # 'auto', 'bfloat16', 'float16', 'float32'


def paired_bootstrap(baseline: list[str], system: list[str], references: list[str], samples: int = 1000) -> dict:
    """Is `system`'s BLEU different from `baseline`'s on these sentences, or could the difference
    be luck? Paired bootstrap resampling (Koehn 2004) as sacreBLEU implements it: draw `samples`
    test sets of the same size from the sentences, with replacement (the same draws for both
    systems), and score both on each. The absolute differences over the draws, shifted to mean 0,
    stand for chance; the p-value is the share of them above the real absolute difference,
    (count + 1) / (samples + 1), a two-sided test: below 0.05 the difference is significant at
    the usual level. Returns both cased BLEU scores (the system's with its 95% interval), the
    difference, the p-value and sacreBLEU's signature (with its seed, 12345 by default)."""
    metric = BLEU(references=[references])
    if list(baseline) == list(system):      # sacreBLEU would say p = 1 / (samples + 1): no difference is no evidence
        s = metric.corpus_score(system, None).score
        return {"baseline": s, "system": s, "system_ci": 0.0, "difference": 0.0, "p_value": 1.0, "signature": ""}
    signature, results = PairedTest([("baseline", baseline), ("system", system)], {"BLEU": metric}, references=None,
                                    test_type="bs", n_samples=samples)()
    base, sys_ = results["BLEU"]
    return {"baseline": base.score, "system": sys_.score, "system_ci": float(sys_.ci),
            "difference": sys_.score - base.score, "p_value": float(sys_.p_value), "signature": str(signature["BLEU"])}


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    if not compare:
        raise ConfigError("give --compare=BASELINE: a checkpoint (.pt) or a file of its translations")
    checkpoint = load_checkpoint(ckpt)
    lowercased = DataConfig.of(checkpoint["data_config"]).lowercase
    if split:
        data = data_of_checkpoint(checkpoint, dataset, verbose=False)
        if split not in data.splits:
            raise ConfigError(f"split='{split}' is not known: use one of {', '.join(data.splits)}")
        sources, references = data.splits[split].src_text, data.splits[split].tgt_text
    elif input and ref:
        sources, references = read_lines(input, "input"), read_lines(ref, "reference")
        if lowercased:               # a model trained on lower-cased text reads and is scored on it
            sources, references = [s.lower() for s in sources], [r.lower() for r in references]
        if len(references) != len(sources):
            raise ConfigError(f"--ref has {len(references)} lines but --input has {len(sources)}")
    else:
        raise ConfigError("give the sentences to score both systems on: --split=test, or --input and --ref")
    rt = setup(device, dtype)

    def translations(checkpoint: dict) -> list[str]:
        model, src_tok, tgt_tok = model_from_checkpoint(checkpoint)
        return translate(model.to(rt.device), src_tok, tgt_tok, sources, beam=beam, alpha=alpha, device=rt.device,
                         amp=rt.amp)

    if compare.endswith(".pt"):
        other = load_checkpoint(compare)
        if DataConfig.of(other["data_config"]).lowercase != lowercased:
            raise ConfigError(f"--compare={compare}: one of the two models was trained on lower-cased text "
                              "and the other was not, so they read and are scored on different text: compare "
                              "checkpoints trained alike, or pass the other's translations as a file")
        baseline = translations(other)
    else:
        baseline = read_lines(compare, "compare")
        if len(baseline) != len(sources):
            raise ConfigError(f"--compare has {len(baseline)} lines but there are {len(sources)} sources")
    r = paired_bootstrap(baseline, translations(checkpoint), references, samples)
    verdict = "significant" if r["p_value"] < 0.05 else "not significant"
    print(f"paired bootstrap ({samples} resamples), {ckpt} vs {compare}: BLEU {r['system']:.2f} vs "
          f"{r['baseline']:.2f}, difference {r['difference']:+.2f}, p = {r['p_value']:.4f} ({verdict} at 0.05)"
          + (f"\n  signature: {r['signature']}" if r["signature"] else ""))


if __name__ == "__main__":
    main_guard(main, DataError)
