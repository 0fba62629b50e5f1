"""The command-line convention shared by every stage (`python -m components.<stage>`).

Each stage's CLI takes the config (`--config file.yaml` or `--config-json '{...}'`)
plus its input/output paths, calls the stage's `run`, and prints one clear error line
(exit code 2) for bad input instead of a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from components.config import Config, ConfigError, config_from_json, load_config
from components.errors import KfpGrpoError
from components.redaction import error_line
from components.training import DivergenceError, NonFiniteError

# Errors that are the user's input or a guarded stop (not a bug): printed as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, KfpGrpoError, ValueError, FileNotFoundError,
                                                NonFiniteError, DivergenceError)


class HelpFormatter(argparse.HelpFormatter):
    """Help with each option's default, unless the help already names it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, "", [],
                                                                                 argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def parser(stage: str, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared --config/--config-json options."""
    p = argparse.ArgumentParser(prog=prog or f"kfp-grpo stage {stage}", description=description,
                                formatter_class=HelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="YAML config (default: the embedded tiny.yaml)")
    g.add_argument("--config-json", help="config as JSON (what pipeline tasks pass)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by --config / --config-json, with its process settings applied."""
    if getattr(args, "config_json", None):
        cfg = config_from_json(args.config_json)
    else:
        cfg = load_config(getattr(args, "config", None))
    apply_process_settings(cfg)
    return cfg


def quiet_hf() -> None:
    """No HF loading bars or advisory warnings: stages print their own progress lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def apply_process_settings(cfg: Config) -> None:
    """Settings a stage process takes from the config (CPU threads)."""
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)


def _kind(annotation: Any) -> tuple[type, bool, bool]:
    """(the value type, whether several values are taken, whether it may be None) of a `run` parameter."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    args = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args):
        return str, True, optional
    kinds = [a for a in (args or [annotation]) if a in (int, float, str)]
    return (kinds[0] if kinds else str), False, optional


def stage_parameters(run: Callable[..., Any]) -> list[tuple[str, inspect.Parameter, type, bool, bool]]:
    """The parameters of a stage's `run` after `cfg`: (name, parameter, value type, takes several, may be None)."""
    hints = typing.get_type_hints(run)
    return [(name, param, *_kind(hints[name])) for name, param in list(inspect.signature(run).parameters.items())[1:]]


def stage_main(run: Callable[..., Any], description: str, help: dict[str, str],
               argv: Sequence[str] | None = None) -> int:
    """A stage's command line, generated from its `run(cfg, ...)`: the inputs and outputs are declared
    once, as `run`'s parameters. A parameter without a default is a required `--name`, a
    `str | list[str]` takes one or more paths, the others their annotated type; `help` describes
    each (every parameter must have an entry). A parameter that may be None is optional."""
    stage = Path(inspect.getfile(run)).stem  # (`run.__module__` is "__main__" under `python -m`)
    p = parser(stage, description)
    for name, param, kind, several, optional in stage_parameters(run):
        kw: dict[str, Any] = {"dest": name, "help": help[name]}
        if param.default is not inspect.Parameter.empty:
            kw["default"] = param.default
        elif not optional:
            kw["required"] = True
        if several:
            kw["nargs"] = "+"
        elif kind is not str:
            kw["type"] = kind
        p.add_argument("--" + name.replace("_", "-"), **kw)
    names = [name for name, *_ in stage_parameters(run)]
    return main_wrapper(lambda a: run(config_from_args(a), **{n: getattr(a, n) for n in names}), p, argv)


def stage_argv(run: Callable[..., Any], **values: Any) -> list[str]:
    """The command-line arguments of `stage_main` that call `run` with `values` (None: left out)."""
    argv: list[str] = []
    for name, _, _, several, _ in stage_parameters(run):
        value = values.get(name)
        if value is None:
            continue
        argv += ["--" + name.replace("_", "-"), *([str(v) for v in value] if several and isinstance(value, list)
                                                 else [str(value)])]
    return argv


def main_wrapper(body: Callable[[argparse.Namespace], Any], p: argparse.ArgumentParser,
                 argv: Sequence[str] | None = None) -> int:
    """Parse argv, run `body`, print its JSON result; user errors → one line, exit 2."""
    args = p.parse_args(argv)
    quiet_hf()
    try:
        result = body(args)
    except USER_ERRORS as err:
        # one line, even for multi-line messages (YAML parser errors, library exceptions); no credential
        print(error_line(err), file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0
