"""Shared plumbing of the three Hydra entry points: where the configs live, and the one-line pre-check.

Hydra reports composition errors over several lines (and a stack-trace hint). Before handing control to
`@hydra.main`, `precheck` composes the same config with Hydra's compose API, runs `seqrl.config.validate`, and turns
any failure into one line: what is wrong and what is allowed. Nothing heavy (no model, no data) is touched.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

_PKG = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The config directory: $SEQRL_CONF_DIR, else the copy inside an installed wheel, else the repository's conf/."""
    env = os.environ.get("SEQRL_CONF_DIR")
    for cand in ([Path(env)] if env else []) + [_PKG / "conf", _PKG.parent.parent / "conf"]:
        if cand.is_dir():
            return cand
    raise FileNotFoundError("seqrl: no config directory found (set SEQRL_CONF_DIR)")


def group_options(group: str) -> list[str]:
    """The option names of a config group (the YAML files under conf/<group>/)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "String": "a string"}


def _unknown_key(cause) -> str:
    """`key: unknown key; allowed: <the keys beside it>`, with a close match first when there is one."""
    from seqrl.config import unknown_key

    return unknown_key(cause.full_key, str(cause.key), (k for k in (cause.parent_node or {}) if k != "hydra"))


def _wrong_type(cause, first: str) -> str:
    """`key='value': must be an integer (...)` for a value the schema's type rejects."""
    target = re.search(r"converted to (\w+)", first)
    want = "true or false" if "valid bool" in first else _TYPE_WORDS.get(target.group(1) if target else "", "")
    why = f"must be {want} (got {type(cause.value).__name__})" if want else first
    return f"{cause.full_key}={cause.value!r}: {why}"


def _one_line(exc: BaseException) -> str:
    """A one-line description of a composition or validation failure: the key, the value and what is allowed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    msg = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
    if isinstance(exc, MissingConfigException) and missing:
        group, name = missing.group(1).strip("/"), missing.group(2)
        return f"{group}={name}: unknown option; allowed: {', '.join(group_options(group))}"
    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        first = str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key and "not in" in first:
            return _unknown_key(cause)
        if isinstance(cause, ValidationError) and key and getattr(cause, "value", None) is not None:
            return _wrong_type(cause, first)
        return f"{key}: {first}" if key else first
    return " ".join(msg.split())


def precheck(config_name: str, argv: list[str]) -> None:
    """Compose `config_name` with the command-line overrides and validate it; exit 2 with one line on failure.

    Skipped when any Hydra flag is given (--help, --cfg, -m, --config-dir, ...): the task validates itself then.
    """
    from hydra import compose, initialize_config_dir

    from seqrl.config import register_configs, validate

    if any(a.startswith("-") for a in argv):
        return
    for arg in argv:  # Hydra's own message for `group=null` names no key
        key, _, value = arg.partition("=")
        if value == "null" and (conf_dir() / key.lstrip("+~")).is_dir():
            print(f"seqrl-{config_name}: error: {arg}: a config group takes one of its options; allowed: "
                  f"{', '.join(group_options(key.lstrip('+~')))}", file=sys.stderr)
            sys.exit(2)
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(argv))
        validate(cfg)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        print(f"seqrl-{config_name}: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def run_entry(config_name: str, task: Callable) -> None:
    """Pre-check, then run `task` under `@hydra.main` (so -m, --cfg job, --help and overrides behave as usual)."""
    import hydra

    from seqrl.config import register_configs

    precheck(config_name, sys.argv[1:])
    register_configs()
    hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(task)()
