"""
Checkpoints: one self-contained dict per file, enough to translate, prune or resume with
nothing else (STYLE.md). A checkpoint holds:
    kind, model_config   which model class and its constructor arguments (per-layer heads after pruning)
    model                the weights (state_dict)
    tokenizers           source/target tokenizer state (merges or characters), no side files
    data_config, train_config   how the data was prepared and every training knob
    step, epoch, ...     where the run stands (train.RunState; the learning rate is a function
                         of it, so it is the scheduler state)
    optimizer, scaler    optimizer moments, fp16 loss scale (random draws are seeded per step:
                         no generator state is needed to resume exactly)
    gated                attention types carrying L0 gates (prune.py's checkpoints while gating)
Written atomically (temporary file, then rename); read with torch.load(weights_only=True), which
accepts tensors and plain Python data and refuses anything that would run code. Averaging the
weights of several checkpoints of one run (`python checkpoint.py --average=... --out=avg.pt`)
makes one more.
"""

import contextlib
import glob
import importlib
import os
import re
from dataclasses import asdict, fields

import torch

from configurator import ConfigError
from data import DataConfig, load_data
from tokenizer import pair_from_state, pair_state

# the only place that knows which model classes exist: arch -> (module, model class, config class)
MODELS = {"transformer": ("model_transformer", "Transformer", "TransformerConfig"),
          "rnn": ("model_rnn", "Seq2SeqRNN", "RNNConfig")}


def model_classes(kind: str):
    if kind not in MODELS:
        raise ConfigError(f"arch='{kind}' is not known: use {' or '.join(repr(k) for k in MODELS)}")
    module_name, model_name, config_name = MODELS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


def build_model(kind: str, model_config: dict, verbose: bool = True):
    model_class, config_class = model_classes(kind)
    return model_class(config_class(**model_config), verbose)


def model_config_from(cfg: dict, src_tok, tgt_tok) -> dict:
    """Model constructor arguments: the knobs whose names the model's config class has, plus the vocabularies."""
    _, config_class = model_classes(cfg["arch"])
    if cfg["tie_embeddings"] not in ("all", "output", "none"):
        raise ConfigError(f"tie_embeddings='{cfg['tie_embeddings']}' is not known: use 'all', 'output' or 'none'")
    if cfg["tie_embeddings"] == "all" and src_tok is not tgt_tok:
        raise ConfigError("tie_embeddings='all' needs joint_vocab=True (one vocabulary for both sides); "
                          "use --tie_embeddings=output with separate vocabularies")
    names = {f.name for f in fields(config_class)}
    return {**{k: v for k, v in cfg.items() if k in names},
            # pad_id is the source's: it builds the source mask (the target side needs only the causal mask)
            "src_vocab": src_tok.vocab_size, "tgt_vocab": tgt_tok.vocab_size, "pad_id": src_tok.pad_id,
            "tie_output": cfg["tie_embeddings"] != "none", "share_src_tgt": cfg["tie_embeddings"] == "all"}


def attach_gates(model, attn_types: list[str]) -> dict:
    """Put a hard-concrete gate (one per head) on every attention module of the given types.

    Returns {type: [gate per layer]}. Only models with attention_modules() (the Transformer) have heads.
    """
    from gates import HardConcreteGate
    if not hasattr(model, "attention_modules"):
        raise ConfigError(f"a {model.kind} model has no attention heads to gate: prune a Transformer checkpoint")
    modules = model.attention_modules()
    gates = {}
    for kind in attn_types:
        if kind not in modules:
            raise ConfigError(f"gate_attn='{kind}' is not known: use enc, dec, cross (comma-separated)")
        gates[kind] = []
        for attn in modules[kind]:
            attn.head_gate = HardConcreteGate(attn.n_head)
            gates[kind].append(attn.head_gate)
    return gates


def gated_types(model) -> list[str]:
    """The attention types whose heads carry L0 gates (while prune.py trains them)."""
    modules = model.attention_modules() if hasattr(model, "attention_modules") else {}
    return [kind for kind, layers in modules.items() if any(m.head_gate is not None for m in layers)]


def checkpoint_of(model, src_tok, tgt_tok, train_config: dict, **training_state) -> dict:
    """The checkpoint dict of a model (see the top of this file): its kind, config and weights,
    the tokenizers, the data and training configs, and whatever training state is given
    (optimizer, scaler, where the run stands)."""
    gated = gated_types(model)
    return {"kind": model.kind, "model_config": asdict(model.cfg), "model": model.state_dict(),
            "tokenizers": pair_state(src_tok, tgt_tok), "data_config": asdict(DataConfig.of(train_config)),
            "train_config": train_config, **({"gated": gated} if gated else {}), **training_state}


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, flush it to the disk, then rename over `path`: a crash or a
    full disk mid-write never destroys the previous file, and a file that exists is complete."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())         # the bytes are on disk before the rename makes them current
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ConfigError(f"could not write checkpoint {path}: {e.strerror or e}. The previous checkpoint "
                          "is untouched; free disk space or choose another --out_dir.") from None


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint with weights_only=True: it can hold tensors and plain data, never code."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint '{path}' does not exist: train one with train.py or pass --ckpt=PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise ConfigError(f"checkpoint '{path}' cannot be loaded safely ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}). It is truncated, corrupt, or not a checkpoint "
                          "of this project (only tensors and plain data are accepted, never code).") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "model" not in ckpt:
        raise ConfigError(f"'{path}' is not a checkpoint of this project (no model kind or weights)")
    return ckpt


def model_from_checkpoint(ckpt: dict, verbose: bool = False):
    """(model with its weights, source tokenizer, target tokenizer) from a checkpoint."""
    model = build_model(ckpt["kind"], ckpt["model_config"], verbose)
    if ckpt.get("gated"):
        attach_gates(model, ckpt["gated"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"the checkpoint's weights do not fit its model config: {detail}") from None
    src_tok, tgt_tok = pair_from_state(ckpt["tokenizers"])
    cfg = ckpt["model_config"]
    if (src_tok.vocab_size, tgt_tok.vocab_size) != (cfg["src_vocab"], cfg["tgt_vocab"]):
        raise ConfigError(f"the checkpoint's tokenizer does not match its model: vocabularies of "
                          f"{src_tok.vocab_size}/{tgt_tok.vocab_size} tokens, embeddings for "
                          f"{cfg['src_vocab']}/{cfg['tgt_vocab']} (source/target)")
    return model, src_tok, tgt_tok


def data_of_checkpoint(ckpt: dict, dataset: str = "", verbose: bool = True):
    """The tokenized splits of the data a checkpoint was trained on; `dataset` replaces its
    location (a local folder when the original was a hub name or another machine's path)."""
    cfg = DataConfig(**ckpt["data_config"])
    if dataset:
        cfg.dataset = dataset
    return load_data(cfg, verbose=verbose)


def keep_snapshot(out_dir: str, checkpoint: dict, step: int, keep: int) -> None:
    """Write a weights-only checkpoint to out_dir/snapshots/step_<step>.pt and delete all but the
    last `keep` snapshots, and any of later steps (left by a run that was killed and is now
    resumed from an earlier checkpoint: it writes them again). train.py averages them at the end."""
    os.makedirs(os.path.join(out_dir, "snapshots"), exist_ok=True)
    save_checkpoint(os.path.join(out_dir, "snapshots", f"step_{step:07d}.pt"), checkpoint)
    up_to_now = [path for s, path in snapshots(out_dir) if s <= step]
    later = [path for s, path in snapshots(out_dir) if s > step]
    for path in up_to_now[:-keep] + later:
        os.remove(path)


def snapshots(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of a run's snapshots, oldest first."""
    folder = os.path.join(out_dir, "snapshots")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [(int(n[5:-3]), os.path.join(folder, n)) for n in names
            if re.fullmatch(r"step_\d+\.pt", n)]                # not a .tmp left by a killed write


def average_checkpoints(paths: list[str]) -> dict:
    """The first checkpoint, with its weights replaced by the mean of every checkpoint's weights
    (and no optimizer state). The checkpoints of the last epochs of a run sit around one minimum,
    each pushed off it by the noise of its last updates; their mean sits closer (Vaswani et al.
    2017 average the last 5-20; Izmailov et al. 2018 explain why). They must share one model config."""
    if not paths:
        raise ConfigError("no checkpoints to average")
    first = last = load_checkpoint(paths[0])
    total = {k: v.double() for k, v in first["model"].items() if v.is_floating_point()}
    for path in paths[1:]:
        last = load_checkpoint(path)
        if last["model_config"] != first["model_config"] or last["kind"] != first["kind"]:
            raise ConfigError(f"'{path}' holds another model than '{paths[0]}': only checkpoints of one run average")
        for k in total:
            total[k] += last["model"][k].double()
    weights = {k: (total[k] / len(paths)).to(v.dtype) if k in total else v for k, v in first["model"].items()}
    keep = ("kind", "model_config", "tokenizers", "data_config", "train_config", "gated")
    return {**{k: first[k] for k in keep if k in first}, "model": weights, "step": last.get("step", 0),
            "averaged": list(paths)}


if __name__ == "__main__":
    # python checkpoint.py --average="out/multi30k/snapshots/*.pt" --out=out/multi30k/avg.pt
    from configurator import configure, main_guard

    def main():
        knobs = {"average": "", "out": ""}   # checkpoints to average (comma-separated paths or globs); the result
        configure(knobs, doc_files=(__file__,))
        paths = sorted(p for pattern in knobs["average"].split(",") if pattern for p in glob.glob(pattern.strip()))
        if not paths or not knobs["out"]:
            raise ConfigError("give --average=PATHS (comma-separated paths or globs) and --out=FILE")
        save_checkpoint(knobs["out"], average_checkpoints(paths))
        print(f"averaged {len(paths)} checkpoints into {knobs['out']}:\n  " + "\n  ".join(paths))

    main_guard(main)
