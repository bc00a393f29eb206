"""Writes the API reference, ``docs/api/*.md``, from camfunc's docstrings and signatures.

    python docs/gen_api.py

One page per layer of the package, in the order they build on each other:
split -> targets (the engine's input) -> methods -> ops -> metrics, viz, zoo,
dataset runs and the command line. ``tests/test_doctests.py`` regenerates the
pages in memory and fails when the committed ones differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import types
import typing
from pathlib import Path

DOCS = Path(__file__).resolve().parent
API = DOCS / "api"
SETUP = DOCS / "example_setup.py"

MODULES = ("camfunc", "camfunc.losses", "camfunc.metrics", "camfunc.models", "camfunc.runs", "camfunc.testing", "camfunc.viz", "camfunc.zoo")
LINE = 88  # a signature longer than this is written one parameter per line


@dataclasses.dataclass(frozen=True)
class Page:
    file: str
    title: str
    intro: str
    sections: tuple[tuple[str, tuple[str, ...]], ...]


def registered_sections() -> list[tuple[str, tuple[str, ...]]]:
    """The registered methods, one section per module in registration order, titled by the
    module docstring's first words: a new method needs no line here."""
    import camfunc

    sections: dict[str, list[str]] = {}
    for name, method in camfunc.METHODS.items():
        sections.setdefault(method.__module__, []).append(f"camfunc.{name}")
    titled = []
    for module, names in sections.items():
        doc = inspect.getdoc(importlib.import_module(module)) or module
        titled.append((re.split(r"[:.]", doc.splitlines()[0])[0], tuple(names)))
    return titled


PAGES = (
    Page("split.md", "Splitting a model", """
A model is cut at a layer into `head: x -> A` and `tail: A -> scores`, a frozen
`camfunc.Split` of plain callables. Every method takes one. Transformer
activations are seen as `(B, C, *spatial)` grids through a `camfunc.Layout`.
""", (
        ("Split", ("camfunc.split", "camfunc.Split", "camfunc.check")),
        ("Layouts", ("camfunc.Layout", "camfunc.with_layout")),
        ("Warnings", ("camfunc.LayerChoiceWarning", "camfunc.RepeatedLayerWarning",
                      "camfunc.NonFiniteWarning")),
    )),
    Page("targets.md", "Targets: what to explain", """
The engine turns `(split, x, cls)` into activations, gradients and scores: the
head runs without an autograd graph, the tail is differentiated with
`torch.func.vjp` with respect to `A` only, and `torch.func.vmap` answers every
requested class in one pass. `cls` is an int, one class per sample (a sequence
or 1-D tensor), a `(B, K)` tensor, `camfunc.topk(k)`, or a callable
`scores -> (B,)` or `(B, K)`; the values below are such callables or markers.
""", (
        ("Top classes", ("camfunc.topk", "camfunc.TopK")),
        ("Contrastive targets", ("camfunc.finer", "camfunc.Finer", "camfunc.rest", "camfunc.ReST")),
    )),
    Page("methods.md", "Methods", """
Every method is a pure function `(split, x, cls, *, normalize=True,
return_scores=False, ...)` returning maps at the layer's resolution,
`(B, *spatial)`, or `(B, K, *spatial)` for K classes per sample, or a list of
those for a split made from a list of layers. Nothing is registered on the model.
""", (
        ("Registry", ("camfunc.METHODS", "camfunc.cam_method", "camfunc.CamMethod",
                      "camfunc.Draws")),
        *registered_sections(),
        ("Whole-model methods", (
            "camfunc.guided_backprop", "camfunc.guided_gradcam", "camfunc.guided_model",
            "camfunc.fullgrad", "camfunc.fullgrad_model", "camfunc.FullGradModel",
            "camfunc.legrad", "camfunc.sess", "camfunc.dff", "camfunc.Factorization")),
        ("Smoothing any method", ("camfunc.aug_smooth",)),
    )),
    Page("ops.md", "Operations on maps", """
Normalising, resizing and fusing finished maps, `(B, *spatial)` or
`(B, K, *spatial)`.
""", (
        ("Operations", ("camfunc.normalize", "camfunc.upsample", "camfunc.fuse")),
    )),
    Page("losses.md", "Training losses: camfunc.losses", """
Pure functions of maps and masks (and, for GAIN, the model) to train with, on maps
made with `differentiable=True`. Maps are resized to the masks' grid; each loss is a
scalar, the mean over maps. The README's "Training with CAMs" shows a training loop.
""", (
        ("Losses", ("camfunc.losses.energy_outside", "camfunc.losses.right_reasons",
                    "camfunc.losses.soft_pointing", "camfunc.losses.attention_mining")),
    )),
    Page("metrics.md", "Metrics", """
Faithfulness, robustness and localisation scores for maps, batched. Each takes
the model as a callable `x -> scores` (a `camfunc.Split` is one). Optional
dependencies (scipy for ROAD) load only when their metric is used.
""", (
        ("Confidence change", (
            "camfunc.metrics.confidence_change", "camfunc.metrics.ConfidenceChange",
            "camfunc.metrics.average_drop", "camfunc.metrics.increase_in_confidence")),
        ("Deletion and insertion", (
            "camfunc.metrics.deletion", "camfunc.metrics.insertion",
            "camfunc.metrics.CausalCurve")),
        ("ROAD and ARCC", (
            "camfunc.metrics.road", "camfunc.metrics.road_curve", "camfunc.metrics.road_impute",
            "camfunc.metrics.arcc")),
        ("Infidelity and sensitivity", (
            "camfunc.metrics.infidelity", "camfunc.metrics.sensitivity_max")),
        ("Localisation", (
            "camfunc.metrics.pointing_game", "camfunc.metrics.PointingGame",
            "camfunc.metrics.energy_pointing_game", "camfunc.metrics.EnergyPointingGame",
            "camfunc.metrics.pointing_game_chance")),
        ("Sanity checks", (
            "camfunc.metrics.model_randomisation", "camfunc.metrics.Randomisation",
            "camfunc.metrics.spearman", "camfunc.metrics.ssim")),
    )),
    Page("viz.md", "Overlays and figures", """
Needs the `viz` extra (`pip install "camfunc[viz]"`: matplotlib and Pillow,
imported only when a function is called).
""", (
        ("Drawing maps", ("camfunc.viz.overlay", "camfunc.viz.figure", "camfunc.viz.save_png")),
    )),
    Page("zoo.md", "The embedded model and its scenes", """
ShapesNet, a small CNN shipped with the package, and the procedurally
generated scenes it was trained on, with exact object masks: ground truth for
localisation metrics, offline.
""", (
        ("Model", ("camfunc.zoo.shapesnet", "camfunc.zoo.ShapesNet", "camfunc.zoo.LAYER",
                   "camfunc.zoo.WEIGHTS_FILE")),
        ("Scenes", ("camfunc.zoo.scenes", "camfunc.zoo.Scenes", "camfunc.zoo.CLASSES",
                    "camfunc.zoo.IMAGE_SIZE", "camfunc.zoo.DECOY_COLOURS")),
    )),
    Page("testing.md", "Property-based testing: camfunc.testing", """
Hypothesis strategies that draw whole test cases (a small model, its split, an
input drawn value by value, the classes), and explanation properties that hold
or raise an `AssertionError` naming the counterexample. A method is any
callable `method(split, x, cls, **options)`. Needs hypothesis
(`pip install "camfunc[testing]"`). The tutorial is [../testing.md](../testing.md);
the matrix of every method under every property is [../properties.md](../properties.md).
""", (
        ("Cases", ("camfunc.testing.cases", "camfunc.testing.Case", "camfunc.testing.models",
                   "camfunc.testing.KitNet", "camfunc.testing.token_models",
                   "camfunc.testing.TokenNet", "camfunc.testing.randomised",
                   "camfunc.testing.inputs", "camfunc.testing.targets")),
        ("Properties", ("camfunc.testing.PROPERTIES", "camfunc.testing.CASES_FOR",
                        "camfunc.testing.batch_independent",
                        "camfunc.testing.class_axis_consistent", "camfunc.testing.deterministic",
                        "camfunc.testing.unit_range", "camfunc.testing.logit_scale_invariant",
                        "camfunc.testing.compile_equivalent",
                        "camfunc.testing.channel_permutation_invariant",
                        "camfunc.testing.implementation_invariant",
                        "camfunc.testing.translation_equivariant",
                        "camfunc.testing.randomisation_sensitive", "camfunc.testing.spearman")),
        ("The property matrix", ("camfunc.testing.property_matrix", "camfunc.testing.Matrix",
                                 "camfunc.testing.Cell")),
    )),
    Page("models.md", "Loading models: camfunc.models", """
The model specs the command line and dataset runs take (`builtin`,
`torchvision:NAME`, `timm:NAME`, `hf:PATH`, `package.module:factory`), loaded
with their input size, normalisation and class names.
""", (
        ("Loading", ("camfunc.models.load", "camfunc.models.LoadedModel",
                     "camfunc.models.UsageError", "camfunc.models.make_split",
                     "camfunc.models.resolve_methods")),
    )),
    Page("run.md", "Dataset-scale runs", """
CAM methods over a whole dataset, in resumable shards, in one process or under
`torchrun`; and reading the results back.
""", (
        ("Runs", (
            "camfunc.runs.run", "camfunc.runs.RunResult", "camfunc.runs.read_maps",
            "camfunc.runs.read_shard")),
    )),
)


# ----------------------------------------------------------------------------
# Public names


def public_names() -> dict[str, object]:
    """Every public name of the public modules, sub-modules left out."""
    names = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not isinstance(obj, types.ModuleType):
                names[f"{module_name}.{name}"] = obj
    return names


class Index:
    """Where each public object is documented, for links and alias notes."""

    def __init__(self, names: dict[str, object]):
        self.names = names
        self.page_of: dict[str, str] = {}
        for page in PAGES:
            for _, items in page.sections:
                for name in items:
                    self.page_of[name] = page.file
        self.check()

    def check(self) -> None:
        listed = set(self.page_of)
        unknown = sorted(listed - set(self.names))
        if unknown:
            raise SystemExit(f"PAGES in docs/gen_api.py lists names that are not public: {unknown}")
        documented = {id(self.names[n]) for n in listed}
        missing = sorted(n for n, obj in self.names.items() if id(obj) not in documented)
        if missing:
            raise SystemExit(f"public names on no page: {missing}; add them to PAGES in docs/gen_api.py")

    def aliases(self, name: str) -> list[str]:
        obj = self.names[name]
        return [n for n, o in self.names.items() if o is obj and n != name and n not in self.page_of]

    def resolve(self, target: str, module: str) -> str | None:
        """The documented public name a docstring's ``:func:`target``` means, if any."""
        candidates = [target, f"camfunc.{target}", f"{module}.{target}"]
        for candidate in candidates:
            if candidate in self.page_of:
                return candidate
            obj = self.names.get(candidate)
            if obj is not None:
                for name, other in self.names.items():
                    if other is obj and name in self.page_of:
                        return name
        return None

    def link(self, name: str, text: str, here: str) -> str:
        page = self.page_of[name]
        where = "" if page == here else page
        return f"[`{text}`]({where}#{name})"

    def public_name_of(self, obj: object) -> str | None:
        for name, other in self.names.items():
            if other is obj:
                return name
        return None


# ----------------------------------------------------------------------------
# Signatures


def _annotation(annotation: object) -> str:
    if isinstance(annotation, typing.ForwardRef):
        text = annotation.__forward_arg__
    elif isinstance(annotation, str):
        text = annotation
    else:
        text = inspect.formatannotation(annotation)
    return re.sub(r"\b_[a-z_]+\.", "", text)  # private module prefixes: _targets.Target -> Target


def _default(value: object, index: Index) -> str:
    if callable(value) and not isinstance(value, type):
        name = index.public_name_of(value)
        if name:
            return name
    return repr(value)


def signature(name: str, obj: object, index: Index) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    parts: list[str] = []
    star_done = False
    params = list(sig.parameters.values())
    for k, param in enumerate(params):
        if param.kind is param.VAR_POSITIONAL:
            star_done = True
        if param.kind is param.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "") + param.name
        if param.annotation is not param.empty:
            text += f": {_annotation(param.annotation)}"
            if param.default is not param.empty:
                text += f" = {_default(param.default, index)}"
        elif param.default is not param.empty:
            text += f"={_default(param.default, index)}"
        parts.append(text)
        last_positional = k + 1 == len(params) or params[k + 1].kind is not param.POSITIONAL_ONLY
        if param.kind is param.POSITIONAL_ONLY and last_positional:
            parts.append("/")
    returns = ""
    if sig.return_annotation is not sig.empty and not inspect.isclass(obj):
        returns = f" -> {_annotation(sig.return_annotation)}"
    prefix = "class " if inspect.isclass(obj) else ""
    one_line = f"{prefix}{name}({', '.join(parts)}){returns}"
    if len(one_line) <= LINE:
        return one_line
    body = "".join(f"    {part},\n" for part in parts)
    return f"{prefix}{name}(\n{body}){returns}"


# ----------------------------------------------------------------------------
# Docstrings: the reST and Google-style bits they use, as Markdown


ROLE = re.compile(r":(func|class|meth|mod|attr|data):`~?([^`]+)`")
MATH = re.compile(r":math:`([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Yields|Example|Examples|Note|Notes):\s*$")


def inline(text: str, index: Index, module: str, here: str) -> str:
    spans: list[str] = []

    def keep(piece: str) -> str:
        spans.append(piece)
        return f"\x00{len(spans) - 1}\x00"

    def role(match: re.Match) -> str:
        target = match.group(2).strip()
        name = index.resolve(target, module)
        return keep(index.link(name, target, here) if name else f"`{target}`")

    text = MATH.sub(lambda m: keep(f"${m.group(1).strip()}$"), text)
    text = ROLE.sub(role, text)
    text = LITERAL.sub(lambda m: keep(f"`{m.group(1)}`"), text)
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """Lines after ``start`` indented deeper than ``base`` (blank lines inside kept), dedented."""
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    block = lines[start + 1:end]
    depth = min((_indent(line) for line in block if line.strip()), default=0)
    return [line[depth:] for line in block], end


def _argument_list(block: list[str], index: Index, module: str, here: str) -> list[str]:
    items: list[str] = []
    for line in block:
        match = re.match(r"^(\*{0,2}[A-Za-z_][\w, *]*?):\s+(.*)$", line)
        if match and not line.startswith(" "):
            items.append(f"- `{match.group(1)}`: {match.group(2)}")
        elif items:
            items[-1] += " " + line.strip()
        else:
            items.append(line.strip())
    return [inline(item, index, module, here) for item in items]


def markdown(doc: str, index: Index, module: str, here: str) -> str:
    lines = doc.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            first = stripped[len(".. math::"):].strip()
            block, i = _block(lines, i, _indent(line))
            body = ([first] if first else []) + block
            out += ["", "```math", *body, "```", ""]
            continue
        section = SECTION.match(stripped)
        if section and _indent(line) == 0:
            block, i = _block(lines, i, 0)
            kind = section.group(1)
            if kind.startswith("Example"):
                out += ["", "**Example:**", "", "```pycon", *block, "```", ""]
            elif kind in ("Args", "Arguments", "Raises"):
                out += ["", f"**{kind}:**", "", *_argument_list(block, index, module, here), ""]
            else:
                text = " ".join(b.strip() for b in block)
                out += ["", f"**{kind}:** {inline(text, index, module, here)}", ""]
            continue
        out.append(inline(line, index, module, here))
        i += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ----------------------------------------------------------------------------
# Objects


def _constant_note(public_name: str) -> str:
    """The ``#:`` comment above a constant's assignment, or the ``#`` comment after it."""
    module_name, _, name = public_name.rpartition(".")
    module = importlib.import_module(module_name)
    sources = [m for m in vars(module).values()
               if isinstance(m, types.ModuleType) and m.__name__.startswith(module_name + ".")]
    for source in sources:
        lines = inspect.getsource(source).split("\n")
        for k, line in enumerate(lines):
            if not re.match(rf"^{name}\s*(:[^=]+)?=", line):
                continue
            above = []
            while k - len(above) - 1 >= 0 and lines[k - len(above) - 1].startswith("#:"):
                above.insert(0, lines[k - len(above) - 1][2:].strip())
            after = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            return " ".join(above) or after
    return ""


def _constant_value(value: object, index: Index) -> str:
    if isinstance(value, dict):
        return "{\n" + "".join(f"    {k!r}: {_default(v, index)},\n" for k, v in value.items()) + "}"
    if isinstance(value, Path):
        package = Path(importlib.import_module("camfunc").__file__).parent
        try:
            return f"<camfunc package>/{value.relative_to(package).as_posix()}"
        except ValueError:
            return repr(value)
    return repr(value)


def _members(obj: type, index: Index, module: str, here: str, label: str) -> list[str]:
    """Public methods and properties a class defines itself, with docstrings."""
    out: list[str] = []
    for member_name, member in vars(obj).items():
        if member_name.startswith("_"):
            continue
        doc = inspect.cleandoc(member.__doc__ or "")  # its own docstring, not one inherited
        if not doc or not (inspect.isfunction(member) or isinstance(member, property)):
            continue
        sig = "" if isinstance(member, property) else signature(member_name, member, index) or ""
        sig = re.sub(r"^\w+\(self(, )?", f"{member_name}(", sig) if sig else member_name
        out += [f"#### `{label}.{sig}`", "", markdown(doc, index, module, here)]
    return out


def render_object(name: str, index: Index, here: str) -> str:
    obj = index.names[name]
    module = name.rpartition(".")[0]
    out = [f'<a id="{name}"></a>', "", f"### `{name}`", ""]
    aliases = index.aliases(name)
    if aliases:
        out += ["Also " + ", ".join(f"`{a}`" for a in aliases) + ".", ""]
    if inspect.isfunction(obj) or inspect.isclass(obj):
        sig = signature(name, obj, index)
        if sig is None and inspect.isclass(obj):
            bases = ", ".join(base.__name__ for base in obj.__bases__)
            sig = f"class {name}({bases})"
        out += ["```python", sig, "```", ""]
        out.append(markdown(inspect.getdoc(obj) or "", index, module, here))
        if inspect.isclass(obj):
            out += _members(obj, index, module, here, name.rpartition(".")[2])
    else:
        out += ["```python", f"{name} = {_constant_value(obj, index)}", "```", ""]
        note = _constant_note(name)
        if note:
            out.append(inline(note, index, module, here) + "\n")
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------
# Pages


NOTICE = "<!-- Generated by docs/gen_api.py from the docstrings; do not edit. -->"


def render_page(page: Page, index: Index) -> str:
    out = [NOTICE, "", f"# {page.title}", "", page.intro.strip(), ""]
    out += ["Examples run after [the shared setup](index.md#examples).", ""]
    for title, names in page.sections:
        out += [f"## {title}", ""]
        for name in names:
            out += [render_object(name, index, page.file), "---", ""]
    return "\n".join(out).rstrip("-\n ") + "\n"


def render_cli() -> str:
    from camfunc import cli

    top = cli.parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {action.dest: action.help for action in subparsers._choices_actions}
    out = [NOTICE, "", "# Command line", "", LITERAL.sub(r"`\1`", inspect.getdoc(cli) or ""), ""]
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
                flag = action.metavar or action.dest
                flag += {"+": " ...", "*": " ..."}.get(action.nargs, "")
            meaning = (action.help or "").replace("|", "\\|")
            if action.required and action.option_strings:
                meaning += " (required)"
            out.append(f"| `{flag}` | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_index(index: Index) -> str:
    out = [NOTICE, "", "# camfunc API reference", "", """
camfunc is layered; each page is one layer, and each layer uses only those
above it:

```
split      model -> Split(head, tail)                      split.md
targets    what cls can be; the engine: head without graph,  targets.md
           vjp of the tail w.r.t. A, vmap over classes
methods    (split, x, cls) -> maps                          methods.md
ops        normalize, upsample, fuse                        ops.md
metrics    faithfulness, robustness, localisation           metrics.md
viz        overlays and figures                             viz.md
zoo        the embedded model and its scenes                zoo.md
runs       whole datasets, in shards                        run.md
cli        the camfunc command                              cli.md
```
""".strip(), ""]
    for page in PAGES:
        names = [n for _, items in page.sections for n in items]
        listed = ", ".join(index.link(n, n.rpartition(".")[2], "index.md") for n in names)
        out += [f"- [{page.title}]({page.file}): {listed}"]
    out += ["- [Command line](cli.md)", ""]
    setup = SETUP.read_text(encoding="utf-8").strip()
    out += ['<a id="examples"></a>', "", "## Examples", "",
            "Every example on these pages is a doctest (`tests/test_doctests.py` runs them) and "
            "starts from the names this file defines (`docs/example_setup.py`). The weights are "
            "random, so examples show shapes rather than values.", "",
            "```python", setup, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def render() -> dict[Path, str]:
    """Every page's path and text."""
    index = Index(public_names())
    pages = {API / page.file: render_page(page, index) for page in PAGES}
    pages[API / "cli.md"] = render_cli()
    pages[API / "index.md"] = render_index(index)
    return pages


def main() -> None:
    API.mkdir(parents=True, exist_ok=True)
    pages = render()
    for stale in API.glob("*.md"):
        if stale not in pages:
            stale.unlink()
    for path, text in pages.items():
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(pages)} pages to {API}")


if __name__ == "__main__":
    main()
