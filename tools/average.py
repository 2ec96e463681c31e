"""
Average the weights of several checkpoints of one run into one more (train.py does this itself
at the end of a run with --average_last=N; this is the same, after the fact, on any files).

    python tools/average.py --average="out/multi30k/snapshots/*.pt" --out=out/multi30k/avg.pt
"""

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the project's files
from checkpoint import average_checkpoints, save_checkpoint  # noqa: E402
from configurator import ConfigError, configure, main_guard  # noqa: E402

average = ""  # checkpoints to average: comma-separated paths or globs
out = ""  # the averaged checkpoint to write
overwrite = False  # may replace an existing --out file (otherwise it is refused)


def main() -> None:
    configure(globals(), doc_files=(__file__,))
    paths = sorted(p for pattern in average.split(",") if pattern for p in glob.glob(pattern.strip()))
    if not paths or not out:
        raise ConfigError("give --average=PATHS (comma-separated paths or globs) and --out=FILE")
    if os.path.exists(out) and not overwrite:
        raise ConfigError(f"{out} exists: choose another --out, or replace it with --overwrite=True")
    save_checkpoint(out, average_checkpoints(paths))
    print(f"averaged {len(paths)} checkpoints into {out}:\n  " + "\n  ".join(paths))


if __name__ == "__main__":
    main_guard(main)
