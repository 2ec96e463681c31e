"""
Configuration the nanoGPT way: a script's knobs are plain module-level values (their defaults),
a `config/<name>.py` file overrides them with plain assignments, `--key=value` wins last; into a
script's globals(), or a dict holding a copy of the defaults (train.py's cfg, which it reads).

    python train.py config/transformer_multi30k.py --batch_tokens=4000 --lambda=0.05

Unlike a bare `exec`, every override is checked: an unknown or misspelled key fails with the close
matches, a value of the wrong type with the type it should have; `-h` prints every knob with its
default and comment. It imports nothing from the project, so any script (tools/ too) can use it.
"""

import difflib
import re
import sys

# `lambda` is a Python keyword, so the knob is `l0_lambda`; the command line accepts both.
ALIASES = {"lambda": "l0_lambda"}


class ConfigError(ValueError):
    """A configuration mistake a person can fix: the message says what and how."""


def knob_names(namespace: dict) -> list[str]:
    """The knobs of a script: its public module-level values of a simple type, but not its
    constants (NAMES_IN_CAPITALS)."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and type(v) in (bool, int, float, str)]


def knob_comments(*paths: str) -> dict[str, str]:
    """Read `name = value  # comment` (or `name: type = value  # comment`) lines from source files."""
    comments = {}
    line_re = re.compile(r"^\s*(\w+)\s*(?::[^=]+)?=[^#]*#\s*(.+)$")
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = line_re.match(line)
                if m and m.group(1) not in comments:
                    comments[m.group(1)] = m.group(2).strip()
    return comments


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else " Run with -h to list the knobs."
    return ConfigError(f"unknown config key '{key}' ({where}).{hint}")


def _check_type(key: str, value, default, where: str):
    """Return `value` as the type of `default`, or fail naming the key."""
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        raise ConfigError(f"config key '{key}' ({where}) must be {want.__name__} like its default "
                          f"{default!r}, got {type(value).__name__} {value!r}")
    return value


def parse_value(key: str, text: str, default):
    """Turn the text after `--key=` into the type of the knob's default."""
    where = f"--{key}={text}"
    want = type(default)
    try:
        if want is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if want is int:
            return int(text)
        if want is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"config key '{key}' ({where}) must be {want.__name__} like its "
                          f"default {default!r}, cannot read {text!r} as one") from None


def apply_config_file(namespace: dict, path: str, known: list[str], strict: bool = True) -> tuple[list, list]:
    """Execute a config file and copy its assignments into `namespace`; return (keys set, keys ignored).

    strict=False ignores keys the caller does not own (tools/data_report.py reads a training
    config for its data knobs and leaves the model knobs alone) instead of failing on them.
    """
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}. "
                          "Give a path such as config/transformer_multi30k.py") from None
    values: dict = {}
    try:
        exec(compile(source, path, "exec"), {}, values)
    except SyntaxError as e:
        raise ConfigError(f"config file '{path}' line {e.lineno}: {e.msg}. "
                          "A config file holds plain assignments such as `n_layer = 3`") from None
    applied, ignored = [], []
    for key, value in values.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        if key not in known:
            if strict:
                raise _unknown_key(key, known, f"in {path}")
            ignored.append(key)
            continue
        namespace[key] = _check_type(key, value, namespace[key], f"in {path}")
        applied.append(key)
    return applied, ignored


def print_help(namespace: dict, known: list[str], doc_files: tuple[str, ...]) -> None:
    script = sys.argv[0]
    comments = knob_comments(*doc_files)
    print(f"usage: python {script} [config/<name>.py] [--key=value ...]\n")
    width = max(len(f"{k} = {namespace[k]!r}") for k in known)
    for key in known:
        setting = f"{key} = {namespace[key]!r}"
        print(f"  {setting:<{width}}  # {comments.get(key, '')}")


def configure(namespace: dict, argv: list[str] | None = None, doc_files: tuple[str, ...] = (),
              strict_file: bool = True) -> dict:
    """Override the knobs in `namespace` from argv; return {key: value} set. namespace: a script's
    globals() (sample.py, prune.py), or a dict of its knobs that it reads instead (train.py's cfg,
    a copy of DEFAULTS: main() can then run more than once in a process, as the tests do).

    argv: optional config file path(s), then --key=value pairs; -h/--help prints the knobs
    (their comments are read from `doc_files`) and exits.
    """
    argv = sys.argv[1:] if argv is None else argv
    known = knob_names(namespace)
    if any(a in ("-h", "--help") for a in argv):
        print_help(namespace, known, doc_files)
        sys.exit(0)
    changed = {}
    for arg in argv:
        if not arg.startswith("--"):
            applied, ignored = apply_config_file(namespace, arg, known, strict=strict_file)
            if ignored:
                print(f"config {arg}: keys for other scripts, not used here: {', '.join(ignored)}")
            changed.update({k: namespace[k] for k in applied})
            continue
        key, eq, text = arg[2:].partition("=")
        key = ALIASES.get(key, key)
        if key not in known:
            raise _unknown_key(key, known, f"in {arg}")
        if not eq and isinstance(namespace[key], bool):
            text = "true"                             # a bare --flag switches a boolean on
        elif not eq:
            raise ConfigError(f"'{arg}' has no value: write --{key}=VALUE")
        namespace[key] = parse_value(key, text, namespace[key])
        changed[key] = namespace[key]
    return changed


def main_guard(fn, *errors: type) -> None:
    """Run a script's main(), turning a ConfigError (or one of `errors`, e.g. data.DataError)
    into one line on stderr and exit code 2: mistakes in the input, not bugs, get no traceback."""
    try:
        fn()
    except (ConfigError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
