"""A griffe extension for the docs site: camfunc's docstrings use reStructuredText roles
(``:func:`split```, ``:math:`w_k```, ``.. math::`` blocks); this rewrites them into the
Markdown that mkdocstrings renders, with cross-references as autorefs.

A role naming a camfunc object becomes a link, ``[`split`][camfunc.split]``; a link to
an object that is not rendered on the site is a warning, which ``mkdocs build --strict``
turns into a failure. Roles naming other libraries (``torch.func.vjp``) stay code.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc):`~?([^`]+)`")
MATH = re.compile(r":math:`([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", flags=re.MULTILINE)
MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


_MISSING = "missing"


def _resolve(target: str, obj: griffe.Object, package: griffe.Module) -> str | None:
    """The public camfunc path a role's target means (as written, beside ``obj``, in its
    public package, or under camfunc); None for a private helper with no public name;
    ``_MISSING`` when nothing of that name exists."""
    scopes = [obj.module.path]
    parts = obj.module.path.split(".")
    scopes += [".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]
    if isinstance(obj, griffe.Class):
        scopes.insert(0, obj.path)
    elif isinstance(obj.parent, griffe.Class):
        scopes.insert(0, obj.parent.path)
    for candidate in [target, *(f"{scope}.{target}" for scope in scopes)]:
        if not candidate.startswith(f"{package.path}."):
            continue
        try:
            package[candidate.removeprefix(f"{package.path}.")]
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        return _public(candidate, package)
    return _MISSING


def _is_private(path: str) -> bool:
    return any(part.startswith("_") for part in path.split("."))


def _public(path: str, package: griffe.Module) -> str | None:
    """The public name an object is documented under (its own path if public), or None."""
    if not _is_private(path):
        return path
    try:
        target = package[path.removeprefix(f"{package.path}.")]
        canonical = target.final_target.path if target.is_alias else target.path
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None  # an alias to another library (torch.func.vjp seen from a camfunc module)
    parts = canonical.split(".")
    for n in range(len(parts), 0, -1):  # a member of a public class: Layout.to_grid
        public = _PUBLIC.get(".".join(parts[:n]))
        if public is not None:
            found = ".".join([public, *parts[n:]])
            return None if _is_private(found) else found
    return None


_PUBLIC: dict[str, str] = {}  # canonical path -> the first public name exporting it


def _index_public(module: griffe.Module) -> None:
    if _is_private(module.path):
        return
    for name in module.exports or ():
        member = module.members.get(str(name))
        if member is None:
            continue
        try:
            target = member.final_target if member.is_alias else member
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        if not isinstance(target, griffe.Module):  # a module's private members stay private
            _PUBLIC.setdefault(target.path, f"{module.path}.{name}")
    for sub in module.modules.values():
        if not sub.is_alias:
            _index_public(sub)


def _math_blocks(text: str) -> str:
    """``.. math:: X`` and its indented continuation lines -> a ``$$ ... $$`` block."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = MATH_BLOCK.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["first"].strip()] if match["first"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += [f"{indent}$$", *(f"{indent}{line}" for line in body if line), f"{indent}$$"]
        if i < len(lines):
            out.append("")
    return "\n".join(out)


def rewrite(text: str, obj: griffe.Object, package: griffe.Module) -> str:
    spans: list[str] = []

    def keep(piece: str) -> str:
        spans.append(piece)
        return f"\x00{len(spans) - 1}\x00"

    def role(match: re.Match[str]) -> str:
        target = match.group(1).strip()
        shown = target.rsplit(".", 1)[-1] if match.group(0).find("~") >= 0 else target
        path = _resolve(target, obj, package)
        if path == _MISSING:  # unknown: a camfunc name links anyway, and the build says so
            head, _, rest = target.partition(".")
            if target.startswith(f"{package.path}."):
                path = target
            elif not rest:
                path = f"{package.path}.{target}"
            else:  # Split.bund: linked under Split's public name; torch.func.vjp stays code
                owner = _resolve(head, obj, package)
                path = f"{owner}.{rest}" if owner not in (None, _MISSING) else None
        return keep(f"[`{shown}`][{path}]" if path else f"`{target}`")

    text = EXAMPLE.sub(r"\g<indent>Examples:", text)  # griffe's Google parser knows "Examples"
    text = _math_blocks(text)
    text = MATH.sub(lambda m: keep(f"${m.group(1).strip()}$"), text)
    text = ROLE.sub(role, text)
    text = LITERAL.sub(lambda m: keep(f"`{m.group(1)}`"), text)
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], text)


def _comment_doc(obj: griffe.Object) -> str | None:
    """A constant's documentation: the ``#:`` comment lines above it, else the comment that
    ends its line (``LAYER = "block3"  # the last spatial layer``)."""
    lines = obj.module.lines
    if not obj.lineno or not lines:
        return None
    above: list[str] = []
    i = obj.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        above.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    if above:
        return "\n".join(above)
    line = lines[obj.lineno - 1]
    if "  # " in line and obj.lineno == obj.endlineno:
        return line.split("  # ", 1)[1].strip().capitalize()
    return None


def _method_signature(obj: griffe.Function) -> None:
    """A method registered with ``@cam_method`` takes ``return_scores`` from the decorator
    and returns maps, or maps and scores: the signature users call, not the one written."""
    if not any("cam_method" in str(d.value) for d in obj.decorators):
        return
    if "return_scores" not in obj.parameters:
        obj.parameters.add(griffe.Parameter(
            "return_scores", annotation="bool", kind=griffe.ParameterKind.keyword_only,
            default="False"))
    obj.returns = "Tensor | list[Tensor] | tuple[...]"


def _walk(obj: griffe.Object, package: griffe.Module, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Function):
        _method_signature(obj)
    if obj.docstring is None and isinstance(obj, griffe.Attribute):
        text = _comment_doc(obj)
        if text:
            obj.docstring = griffe.Docstring(text, parent=obj, lineno=obj.lineno)
    if obj.docstring is not None:
        obj.docstring.value = rewrite(obj.docstring.value, obj, package)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, package, seen)  # type: ignore[arg-type]


def _lazy_alias(module: griffe.Module, name: str, value: object) -> None:
    """A member a module's ``__getattr__`` imports on first use, as an alias to where it is
    defined (camfunc.metrics loads each metric's module, and its dependencies, lazily)."""
    defined_in = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if defined_in and qualname and defined_in.split(".")[0] == module.path.split(".")[0]:
        module.set_member(name, griffe.Alias(name, f"{defined_in}.{qualname}", parent=module))


def _document_constant(module: griffe.Module, name: str) -> None:
    """An exported constant with no documentation still gets its entry (name and value)."""
    member = module.members.get(name)
    try:
        target = member.final_target if member is not None and member.is_alias else member
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return
    if isinstance(target, griffe.Attribute) and target.docstring is None and not _comment_doc(target):
        target.docstring = griffe.Docstring("A constant; its value is shown above.", parent=target)


def _exports(module: griffe.Module) -> None:
    """Each public module's ``__all__`` as the interpreter sees it: camfunc builds some of
    them (the registered methods), which a static reading cannot evaluate."""
    if not any(part.startswith("_") for part in module.path.split(".")):
        runtime = importlib.import_module(module.path)
        names = getattr(runtime, "__all__", None)
        if names is not None:
            module.exports = [str(name) for name in names]
            for name in module.exports:
                if name not in module.members:  # resolved lazily, by a module __getattr__
                    _lazy_alias(module, name, getattr(runtime, name))
                _document_constant(module, name)
    for member in module.modules.values():
        if not member.is_alias:
            _exports(member)


class RstRoles(griffe.Extension):
    """Rewrites every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _exports(pkg)
        _index_public(pkg)
        _walk(pkg, pkg, set())
