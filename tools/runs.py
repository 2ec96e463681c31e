"""
Run folders side by side: their curves overlaid in one figure (training and validation loss,
validation BLEU, gradient norm, learning rate, tokens/s; one colour per run), a table of where
each run ended, and the knobs that differ between them (read from each run's checkpoint).

    python tools/runs.py out/toy_a out/toy_b --out=runs.png --x=minutes --labels=lr3e-3,lr1e-3

Leaves out: TensorBoard, smoothing of noisy curves, runs still being written to (it reads what is there).
"""

import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
from checkpoint import load_checkpoint  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402

out = "runs.png"  # the figure to write
x = "step"  # the horizontal axis: 'step' or 'minutes' (wall clock, validation included)
labels = ""  # names for the runs in the legend and tables, comma-separated (default: the folder names)

# (panel title, record kind, key in the record, log scale)
PANELS = (("training loss", "train", "loss", False),
          ("validation loss", "eval", "val_loss", False),
          ("validation BLEU (greedy)", "eval", "bleu", False),
          ("gradient norm (before clipping)", "train", "gnorm", True),
          ("learning rate", "train", "lr", False),
          ("target tokens/s", "train", "tok_per_s", False))
NOT_KNOBS = ("out_dir",)     # differs between any two runs and is already each run's name


def read_run(folder: str, name: str = "") -> dict:
    """The records of a run folder's log.jsonl by kind: {"name", "folder", "train": [...], "eval":
    [...], "init": [...]}. name: the run's label (default: the folder's name). A line cut short by a
    kill is skipped; NaN losses of a diverged run come back as float('nan')."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder} does not exist: give the --out_dir of a run of train.py")
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder} has no log.jsonl: is it a run folder of train.py?")
    run = {"name": name or os.path.basename(os.path.normpath(folder)), "folder": folder,
           "train": [], "eval": [], "init": []}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("kind") in ("train", "eval", "init"):
                run[record["kind"]].append(record)
    return run


def run_config(folder: str) -> tuple[dict | None, str]:
    """(train_config, the file it came from) of a run: ckpt.pt, else best.pt; (None, why not) when
    neither can be read (a run stopped before its first checkpoint)."""
    why = f"{folder} has no ckpt.pt or best.pt"
    for file in ("ckpt.pt", "best.pt"):
        path = os.path.join(folder, file)
        if os.path.isfile(path):
            try:
                return dict(load_checkpoint(path).get("train_config", {})), file
            except ConfigError as e:
                why = str(e)
    return None, why


def differing_knobs(configs: dict[str, dict]) -> dict[str, dict]:
    """{knob: {run name: value}} for the knobs whose values are not the same in every run. A knob one
    run lacks (a knob added after it was trained) counts as differing and is missing from its dict.

        differing_knobs({"a": {"lr": 3e-3, "d_model": 64}, "b": {"lr": 1e-3, "d_model": 64}})
        -> {"lr": {"a": 0.003, "b": 0.001}}
    """
    knobs = sorted({k for config in configs.values() for k in config} - set(NOT_KNOBS))
    differ = {}
    for knob in knobs:
        values = {name: config[knob] for name, config in configs.items() if knob in config}
        if len(values) < len(configs) or len({repr(v) for v in values.values()}) > 1:
            differ[knob] = values
    return differ


def series(run: dict, kind: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of one curve; a value that is missing or not finite becomes NaN, a gap in the line.
    Validation records carry no minutes: theirs are read off the training records' clock."""
    records = run[kind]
    ys = [value(r.get(key)) for r in records]
    steps = [r["step"] for r in records]
    if x == "step":
        return steps, ys
    clock = [(0, 0.0)] + [(r["step"], value(r.get("minutes"))) for r in run["train"]]
    clock = [(s, m) for s, m in clock if math.isfinite(m)]
    if len(clock) == 1:                                 # no training record tells the time
        return [math.nan] * len(steps), ys
    return [interpolate(s, clock) for s in steps], ys


def value(v) -> float:
    """A record's number as a float; NaN if it is missing, not a number or not finite (inf is a gap too)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def interpolate(step: int, clock: list[tuple[int, float]]) -> float:
    """The minutes at `step` on a (step, minutes) clock, straight between its points."""
    for (s0, m0), (s1, m1) in zip(clock, clock[1:]):
        if s0 <= step <= s1:
            return m0 + (m1 - m0) * (step - s0) / max(s1 - s0, 1)
    return clock[-1][1] if clock and step > clock[-1][0] else math.nan     # after the last log line: its time


def plot_runs(runs: list, path: str, x: str = "step", title: str = "") -> str:
    """Draw the runs' curves into one PNG at `path`: a panel per PANELS entry, one colour per run,
    one legend for the figure. runs: run folders, or read_run's dicts (for labels of your own)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if x not in ("step", "minutes"):
        raise ConfigError(f"x='{x}' is not known: use step or minutes")
    runs = [read_run(str(r)) if isinstance(r, (str, os.PathLike)) else r for r in runs]
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (panel, kind, key, log_scale) in zip(axes.flat, PANELS):
        drawn = []
        for i, run in enumerate(runs):
            xs, ys = series(run, kind, key, x)
            style = "o-" if kind == "eval" else "-"       # few validation points: show each one
            ax.plot(xs, ys, style, color=colours(i % colours.N), markersize=3, linewidth=1.3)
            drawn += [y for y in ys if math.isfinite(y)]
        positive = [y for y in drawn if y > 0]
        # a loss far above the others' (one that starts 75x ln(V)) would flatten them all: log scale
        if positive and (log_scale or "loss" in key and max(positive) > 50 * min(positive)):
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))   # 0.2 0.5 1 2 5: few, plain labels
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        if not drawn:
            ax.text(0.5, 0.5, f"no {kind} records", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(panel)
        ax.set_xlabel("step" if x == "step" else "minutes (wall clock)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colours(i % colours.N), linewidth=2.5) for i in range(len(runs))]
    top = 0.965 if title else 1.0
    fig.legend(handles, [r["name"] for r in runs], loc="upper center", bbox_to_anchor=(0.5, top),
               ncol=min(len(runs), 6), frameon=False, fontsize=11)
    if title:
        fig.suptitle(title, y=0.995, fontsize=13)
    legend_rows = math.ceil(len(runs) / 6)
    fig.tight_layout(rect=(0, 0, 1, top - 0.035 * legend_rows))     # the panels below legend and title
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def final_table(runs: list[dict]) -> list[str]:
    """A markdown table, one row per run: steps, minutes, last training loss, best validation BLEU
    and its step, last validation loss, median tokens/s ('-' where the run has no such record)."""
    lines = ["| run | steps | minutes | last train loss | best val BLEU (step) | last val loss | median tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        train, evals = run["train"], run["eval"]
        steps = max((r["step"] for r in train + evals), default=None)
        scored = [(value(r.get("bleu")), r["step"]) for r in evals]
        best = max([(b, s) for b, s in scored if math.isfinite(b)], key=lambda bleu_step: bleu_step[0], default=None)
        speeds = [s for s in (value(r.get("tok_per_s")) for r in train) if math.isfinite(s)]
        cells = [run["name"], "-" if steps is None else f"{steps:,}",
                 fmt(train[-1].get("minutes") if train else None, ".1f"),
                 fmt(train[-1].get("loss") if train else None, ".4f"),
                 "-" if best is None else f"{best[0]:.2f} ({best[1]:,})",
                 fmt(evals[-1].get("val_loss") if evals else None, ".3f"),
                 fmt(statistics.median(speeds) if speeds else None, ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fmt(v, spec: str) -> str:
    """A number as `spec`; '-' for none, 'nan' for a diverged value."""
    return "-" if v is None else format(value(v), spec)


def knobs_table(configs: dict[str, dict]) -> list[str]:
    """The differing knobs as a markdown table (knob | run a | run b ...), then how many are equal."""
    differ = differing_knobs(configs)
    names = list(configs)
    equal = len({k for c in configs.values() for k in c} - set(NOT_KNOBS)) - len(differ)
    if not differ:
        return [f"all {equal} knobs are the same in {', '.join(names)}"]
    lines = ["| knob | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for knob, values in differ.items():
        cells = [cell(values[n]) if n in values else "(absent)" for n in names]
        lines.append(f"| {knob} | " + " | ".join(cells) + " |")
    differs = "1 knob differs" if len(differ) == 1 else f"{len(differ)} knobs differ"
    return lines + [f"{differs}; {equal} more are the same in every run (not listed)"]


def cell(v) -> str:
    text = repr(v) if v == "" else str(v)             # '' rather than an empty cell
    return text.replace("|", "\\|")                    # a | would split the markdown cell


def run_names(folders: list[str], given: str) -> list[str]:
    """--labels if given, else the folders' names; the whole path where two names would clash."""
    if given:
        names = [n.strip() for n in given.split(",")]
        if len(names) != len(folders):
            raise ConfigError(f"--labels names {len(names)} runs but {len(folders)} folders are given: one label each")
        return names
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    return [os.path.normpath(f) if names.count(n) > 1 else n for n, f in zip(names, folders)]


def main() -> None:
    # the run folders are the arguments without '--': configure would read a bare path as a config file
    argv = sys.argv[1:]
    folders = [a for a in argv if not a.startswith("-")]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n")
    configure(globals(), [a for a in argv if a.startswith("-")], doc_files=(__file__,))
    if not folders:
        raise ConfigError("give the run folders to compare: python tools/runs.py out/a out/b [--out=runs.png]")
    runs = [read_run(f, name) for f, name in zip(folders, run_names(folders, labels))]
    figure = plot_runs(runs, out, x)
    print("\n".join(final_table(runs)) + "\n")
    configs = {}
    for run in runs:
        config, source = run_config(run["folder"])
        if config is None:
            print(f"{run['name']}: {source}: its knobs are not compared")
        else:
            configs[run["name"]] = config
    if len(configs) >= 2:
        print("\n".join(knobs_table(configs)) + "\n")
    elif len(runs) >= 2:
        print("fewer than two runs have a checkpoint: no knobs to compare\n")
    print(f"wrote {figure} ({len(runs)} runs against {x})")


if __name__ == "__main__":
    main_guard(main)
