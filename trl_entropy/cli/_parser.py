"""The :class:`~trl.TrlParser` of every ``trl-entropy`` command, in a module of its own: importing it imports
transformers' argument parser, which ``trl-entropy --help`` does without (:mod:`trl_entropy.cli.main` imports this
module when a command's options are parsed)."""

from __future__ import annotations

import sys
from typing import NoReturn

from trl import TrlParser

from .main import _CURRENT_NAMES, UsageError, _current_option

__all__ = ["OneLineParser"]


class OneLineParser(TrlParser):
    """A :class:`~trl.TrlParser` whose errors are one line: the option, what it accepts, and what was given; options
    with a deprecated transformers name are read under the current one."""

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        args = [_current_option(item) for item in (sys.argv[1:] if args is None else args)]
        return super().parse_args_and_config(args, *rest, **kwargs)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        return super().set_defaults_with_config(**{_CURRENT_NAMES.get(k, k): v for k, v in kwargs.items()})

    def error(self, message: str) -> NoReturn:
        option = message.split(":", 1)[0].removeprefix("argument ").split("/")[0]
        action = next((a for a in self._actions if option in a.option_strings), None)
        if action is not None and action.help and action.choices is None and "invalid" in message:
            message = f"{message} ({action.help})"
        raise UsageError(f"{message}; see `{self.prog} --help`")
