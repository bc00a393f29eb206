"""The ``camfunc`` command: ``demo``, ``explain``, ``evaluate``, ``run`` and ``report``.

Exit status: 0 when everything was done, 1 when some items failed (each is
reported on stderr and in the JSON written), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
import types

from camfunc.cli._common import call_handler


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="camfunc", description="Hook-free class activation maps.")
    top.add_argument("--version", action="version", version=_version())
    subparsers = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _subcommands():
        module.register(subparsers)
    return top


def _subcommands() -> list[types.ModuleType]:
    from camfunc.cli import _demo, _evaluate, _explain, _report, _run

    return [_demo, _explain, _evaluate, _run, _report]


def _version() -> str:
    from camfunc import __version__

    return f"camfunc {__version__}"


def main(argv: list[str] | None = None) -> int:
    return call_handler(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
