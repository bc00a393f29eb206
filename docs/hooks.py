"""mkdocs hooks for the docs site: the command-line reference, written from the ``camfunc``
parser at build time (mkdocstrings documents Python objects, not argparse parsers)."""

from __future__ import annotations

import argparse
import inspect
import re
from typing import Any

CLI_PAGE = "api/cli.md"
LITERAL = re.compile(r"``([^`]+)``")


def render_cli() -> str:
    from camfunc import cli

    top = cli.parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {action.dest: action.help for action in subparsers._choices_actions}
    out = ["# Command line", "", LITERAL.sub(r"`\1`", inspect.getdoc(cli) or ""), ""]
    out += ["| command | what it does |", "| --- | --- |"]
    out += [f"| [`camfunc {n}`](#camfunc-{n}) | {summaries.get(n, '')} |" for n in subparsers.choices]
    out.append("")
    for command, parser in subparsers.choices.items():
        out += [f"## camfunc {command}", "", parser.description or summaries.get(command, ""), ""]
        out += ["| argument | meaning |", "| --- | --- |"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                flag = ", ".join(action.option_strings)
                if action.nargs != 0:
                    metavar = action.metavar or (
                        "{" + ",".join(map(str, action.choices)) + "}" if action.choices
                        else action.dest.upper())
                    flag += f" {metavar}"
            else:
                flag = str(action.metavar or action.dest)
                flag += {"+": " ...", "*": " ..."}.get(str(action.nargs), "")
            meaning = (action.help or "").replace("|", "\\|")
            if action.required and action.option_strings:
                meaning += " (required)"
            out.append(f"| `{flag}` | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == CLI_PAGE:
        return render_cli()
    return markdown
