"""``--config FILE``: flag values from a YAML or JSON file, under the command line's.

A config file is a mapping from flag names to values::

    # mcl_x2.yaml
    arch: resnet32
    number_net: 2
    alpha: 0.1
    milestones: [150, 225]
    logit-distill: true

Keys are the flags' names without the leading dashes, with ``-`` or ``_`` (``init_lr``
and ``init-lr`` both work; so do aliases such as ``seed`` for ``--manual_seed``). The
file's values become the parser's defaults, so any flag on the command line wins. A
run's own ``config.json`` is such a file: the keys it records besides the flags
(:data:`utils.run_files.RECORDED_KEYS`: topology, versions, provenance, ...) are
skipped. Any other key that is not a flag of the script is an error naming it.
"""
import argparse
import difflib
import json
import os
from typing import Any, Dict, List, Optional

from utils.errors import ConfigError
from utils.run_files import RECORDED_KEYS

CONFIG_FLAG = "--config"


def add_config_flag(group: Any) -> None:
    """Add ``--config FILE`` to a parser or argument group."""
    group.add_argument(CONFIG_FLAG, default=None, metavar="FILE",
                       help="YAML or JSON file of flag values (keys: flag names without the dashes); flags on "
                            "the command line override it. A run's own config.json reruns that run")


def has_config_flag(parser: argparse.ArgumentParser) -> bool:
    return CONFIG_FLAG in parser._option_string_actions


def find_config_path(argv: List[str]) -> Optional[str]:
    """The value of ``--config`` in ``argv`` (the last one), or None."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument(CONFIG_FLAG, default=None)
    known, _ = finder.parse_known_args(argv)
    return known.config


def _parse_yaml(text: str, path: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"--config {path} is YAML, which needs PyYAML: pip install pyyaml (or pip install -e "
                          "\".[yaml]\"), or write the file as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(err).split())}") from None


def _parse_json(text: str, path: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") \
            from None


def read_config_file(path: str) -> Dict[str, Any]:
    """The mapping a YAML (.yaml, .yml) or JSON file holds; other names are read as JSON, then YAML."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read --config {path} ({err.strerror or err})") from None
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml"):
        values = _parse_yaml(text, path)
    elif ext == ".json":
        values = _parse_json(text, path)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = _parse_yaml(text, path)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values, not a "
                          f"{type(values).__name__}")
    return values


def flag_actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """{key: action} for every spelling a config file may use: destinations and option names without
    dashes, each with ``-`` and ``_``."""
    keys: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.dest == "config":
            continue
        names = [action.dest] + [o.lstrip("-") for o in action.option_strings if o.startswith("--")]
        for name in names:
            keys.setdefault(name, action)
            keys.setdefault(name.replace("-", "_"), action)
            keys.setdefault(name.replace("_", "-"), action)
    return keys


def _describe(action: argparse.Action) -> str:
    if action.type is int:
        return "an integer"
    if action.type is float:
        return "a number"
    return "a string"


def _scalar(action: argparse.Action, value: Any, key: str, path: str) -> Any:
    """One value of ``action`` from a config file, converted as the command line would."""
    def bad() -> ConfigError:
        return ConfigError(f"--config {path}: {key} must be {_describe(action)} (got {value!r})")

    if isinstance(value, (dict, list, bool)):
        raise bad()
    if action.type in (int, float):
        if isinstance(value, str):
            try:
                value = action.type(value)
            except ValueError:
                raise bad() from None
        elif action.type is int and not isinstance(value, int):
            raise bad()
        value = action.type(value)
    elif action.type is None or action.type is str:
        value = str(value)
    elif isinstance(value, str):
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))} "
                          f"(got {value!r})")
    return value


def config_value(action: argparse.Action, value: Any, key: str, path: str) -> Any:
    """``value`` (from a config file) as ``action`` stores it; ConfigError naming ``key`` when it does not fit."""
    if action.nargs == 0:  # a switch: the value is what its destination holds (as config.json records it)
        if not isinstance(value, bool):
            raise ConfigError(f"--config {path}: {key} must be true or false (got {value!r})")
        return value
    if value is None:
        if action.default is not None and action.nargs != "?":
            raise ConfigError(f"--config {path}: {key} cannot be null")
        return None
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not values:
            raise ConfigError(f"--config {path}: {key} needs at least one value")
        return [_scalar(action, v, key, path) for v in values]
    return _scalar(action, value, key, path)


def config_defaults(parser: argparse.ArgumentParser, values: Dict[str, Any], path: str) -> Dict[str, Any]:
    """{destination: value} of a config file's ``values`` for ``parser``; ConfigError naming every unknown key."""
    actions = flag_actions(parser)
    unknown = [k for k in values if k not in actions and k not in RECORDED_KEYS and k != "config"]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else str(key))
        raise ConfigError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                          "keys are this script's flag names without the dashes (see --help)")
    return {actions[k].dest: config_value(actions[k], v, k, path) for k, v in values.items() if k in actions}


def apply_config_file(parser: argparse.ArgumentParser, argv: List[str]) -> Optional[str]:
    """Make the values of ``--config FILE`` (if ``argv`` names one) the defaults of ``parser``.

    Returns the file's path, or None.
    """
    path = find_config_path(argv)
    if path is None:
        return None
    parser.set_defaults(**config_defaults(parser, read_config_file(path), path))
    return path
