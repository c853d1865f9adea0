"""`massedit` command line: one subcommand per module in engine/commands."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from massedit import __version__
from massedit.commands._common import UserError

# Each module defines NAME, HELP, add_arguments(parser) and run(args) -> int.
COMMANDS = ("demo", "stats", "edit", "eval", "world", "trace", "ledger", "models", "delta", "data")


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one line like every other error; the usage itself is in --help.
    Subcommand parsers inherit this class from add_subparsers."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="massedit",
        description="Batched knowledge editing (MEMIT) for causal language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"massedit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"massedit.commands.{name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse reports them on the top-level parser; name the subcommand they were given to.
        prog = " ".join(["massedit"] + [v for v in (getattr(args, "command", None), getattr(args, "action", None)) if v])
        _stderr_line(f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see {prog} --help)")
        return 2
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from safetensors import SafetensorError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        _stderr_line("massedit: interrupted")
        return 130
    except (UserError, ValueError, KeyError, OSError, SafetensorError) as err:
        if args.debug:
            raise
        if isinstance(err, SafetensorError):
            message = _safetensors_message(err, args)
        elif isinstance(err, OSError) and err.filename is not None:
            message = _os_error_message(err)
        else:
            message = _first_line(err)
        _stderr_line(f"massedit {args.command}: error: {message}")
        return 2


def _stderr_line(text: str) -> None:
    """One write for the line and its newline: under torchrun every rank shares one stderr pipe, and print's two
    writes let two ranks' messages run together on one line."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _first_line(err: object) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _one_line_warning(command: str):
    """Warnings as one line each, like errors: no source file and line of the library."""

    def show(message, category, filename, lineno, file=None, line=None):
        _stderr_line(f"massedit {command}: warning: {_first_line(message)}")

    return show


def _os_error_message(err: OSError) -> str:
    """The system's words with the path, e.g. 'Permission denied: out/report.json'."""
    paths = ", ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{err.strerror or _first_line(err)}: {paths}"


def _safetensors_message(err: Exception, args) -> str:
    """safetensors does not say which file it could not read: find it among the command's paths."""
    from safetensors import SafetensorError, safe_open

    candidates = []
    for value in vars(args).values():
        if not isinstance(value, str) or not value:
            continue
        path = Path(value)
        if path.is_dir():
            candidates += sorted(path.glob("*.safetensors"))
        elif path.suffix == ".safetensors":
            candidates.append(path)
    for path in candidates:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return (f"{path}: not a readable safetensors file, truncated or corrupt ({_first_line(err)}); "
                    "restore or re-create it")
    return f"a .safetensors file is truncated or corrupt ({_first_line(err)})"


if __name__ == "__main__":
    sys.exit(main())
