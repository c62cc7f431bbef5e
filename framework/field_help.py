"""What a config dataclass's fields mean, for ``slimlab run --help``, read from where authors already write it.

A field's help text is, in order: ``field(metadata={"help": ...})``; else the comment trailing the field and the
comment line(s) right above it (no blank line between); else a string literal right after the field (an attribute
docstring); else nothing. Comments are read from the class's source (its module's file, with ``tokenize``), so
any plugin's dataclass gets help without importing anything from slimlab; a class without source (built with
``make_dataclass``, in a REPL) simply has none. A subclass inherits the help of the fields it does not document.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import linecache
import re
import textwrap
import tokenize
from collections.abc import Iterator

# Tool directives (a linter's, a type checker's, a formatter's) are not help.
_PRAGMA = re.compile(r"\s*#\s*(noqa\b|type:|fmt:|pragma\b|pyright:|mypy:|pylint:|ruff:|isort:|nosec\b).*$", re.I)


def fields_help(cls: type) -> dict[str, str]:
    """``{field name: help text}`` for every field of dataclass ``cls`` that has help (see the module docstring)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    from_source = _source_help(cls if isinstance(cls, type) else type(cls))
    result = {}
    for item in dataclasses.fields(cls):
        text = item.metadata.get("help") or getattr(item, "doc", None) or from_source.get(item.name)
        if text:
            result[item.name] = " ".join(str(text).split())
    return result


def field_help(cls: type, name: str) -> str | None:
    """The help text of field ``name`` of dataclass ``cls``; None when it has none."""
    return fields_help(cls).get(name)


def class_summary(cls: type) -> str | None:
    """``cls``'s own docstring's first paragraph; None for the signature a dataclass gets when it has none."""
    doc = cls.__dict__.get("__doc__")
    if not doc or (dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}(")):
        return None
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip() or None


@functools.cache
def _source_help(cls: type) -> dict[str, str]:
    """Help from comments and attribute docstrings of ``cls`` and its bases (the class nearest ``cls`` wins)."""
    result: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            result.update(_class_comments(klass))
    return result


def _class_comments(cls: type) -> dict[str, str]:
    """Help for the annotated names in ``cls``'s own body, from its source; {} when the source cannot be read."""
    found = _class_node(cls)
    if found is None:
        return {}
    node, (trailing, alone) = found
    result = {}
    for index, statement in enumerate(node.body):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above = []
        line = statement.lineno - 1
        while line in alone:  # the comment block right above, up to a blank line or code
            above.insert(0, alone[line])
            line -= 1
        end = statement.end_lineno or statement.lineno
        after = [text for n in range(statement.lineno, end + 1) for text in trailing.get(n, [])]
        parts = [text for text in (*above, *after) if text]
        if not parts and index + 1 < len(node.body):  # an attribute docstring: `x: int = 1` then `"""What x is."""`
            following = node.body[index + 1]
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                parts = [inspect.cleandoc(following.value.value)]
        if parts:
            result[statement.target.id] = " ".join(parts)
    return result


Comments = tuple[dict[int, list[str]], dict[int, str]]  # (line -> comments after code, line -> a whole-line one)


def _class_node(cls: type) -> tuple[ast.ClassDef, Comments] | None:
    """``cls``'s definition as a syntax tree, and the comments in it by line (the tree's line numbers).

    Only the class's own lines are parsed and tokenized (``--help`` shows classes from many modules). None when
    the source is not there or the definition is ambiguous: no help rather than another class's.
    """
    try:
        filename = inspect.getsourcefile(cls)
    except TypeError:  # a built-in class
        return None
    lines = linecache.getlines(filename) if filename else []
    start = _class_line(cls, filename, lines) if lines else None
    return _parse_class(_block(lines, start), cls.__name__) if start is not None else None


def _class_line(cls: type, filename: str, lines: list[str]) -> int | None:
    """The index in ``lines`` of ``cls``'s ``class`` statement; None if not found or not known which it is."""
    statement = re.compile(rf"\s*class\s+{re.escape(cls.__name__)}\b")
    first = getattr(cls, "__firstlineno__", None)  # Python 3.13+: the line of its first decorator
    if isinstance(first, int):
        return next((i for i in range(first - 1, len(lines)) if statement.match(lines[i])), None)
    starts = [i for i, line in enumerate(lines) if statement.match(line)]
    if len(starts) == 1:  # the common case, without parsing the module
        return starts[0]
    tree = _module_tree(filename)
    candidates = _find_classes(tree, cls.__qualname__) if tree is not None else []
    if len(candidates) > 1:  # one name defined twice (in two branches, say): a method's line tells which
        inside = _method_lines(cls, filename)
        candidates = [c for c in candidates if any(c.lineno <= n <= (c.end_lineno or 0) for n in inside)]
    return candidates[0].lineno - 1 if len(candidates) == 1 else None


def _method_lines(cls: type, filename: str) -> list[int]:
    """First lines of the functions written in ``cls``'s body (not those dataclasses generate)."""
    result = []
    for value in vars(cls).values():
        function = getattr(value, "__func__", getattr(value, "fget", value))  # classmethod, property
        code = getattr(function, "__code__", None)
        if code is not None and code.co_filename == filename:
            result.append(code.co_firstlineno)
    return result


def _block(lines: list[str], start: int) -> str:
    """The statement starting at ``lines[start]`` and its indented body (up to the next code indented as little)."""

    def inside(line: str) -> bool:
        text = line.strip()
        return not text or text.startswith("#") or len(line) - len(line.lstrip()) > indent

    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and inside(lines[end]):
        end += 1
    return "".join(lines[start:end])


def _parse_class(source: str, name: str) -> tuple[ast.ClassDef, Comments] | None:
    """The class statement ``source`` (indented or not) as a tree, with its comments; None if it is not one."""
    source = textwrap.dedent(source)
    try:
        body = ast.parse(source).body
        comments = _comments(source)
    except (SyntaxError, ValueError, tokenize.TokenError):
        return None
    if len(body) != 1 or not isinstance(body[0], ast.ClassDef) or body[0].name != name:
        return None
    return body[0], comments


@functools.cache
def _module_tree(filename: str) -> ast.Module | None:
    try:
        return ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError):
        return None


def _comments(source: str) -> Comments:
    """The comments of ``source`` by line."""
    trailing: dict[int, list[str]] = {}
    alone: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        text, line = _comment_text(token.string), token.start[0]
        if token.line[: token.start[1]].strip():
            trailing.setdefault(line, []).append(text)
        else:
            alone[line] = text
    return trailing, alone


def _find_classes(tree: ast.Module, qualname: str) -> list[ast.ClassDef]:
    """Every definition of class ``qualname`` (``Outer.Inner``, ``function.<locals>.Config``) in ``tree``."""
    scopes: list[ast.AST] = [tree]
    for part in qualname.split("."):
        if part != "<locals>":
            scopes = [found for scope in scopes for found in _definitions(scope, part)]
    return [scope for scope in scopes if isinstance(scope, ast.ClassDef)]


def _definitions(node: ast.AST, name: str) -> Iterator[ast.AST]:
    """The classes and functions called ``name`` directly in ``node``'s scope (under an ``if``, a ``try``...)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if child.name == name:
                yield child
        else:
            yield from _definitions(child, name)


def _comment_text(comment: str) -> str:
    """A comment's words: without its ``#`` (or Sphinx's ``#:``) and any tool directive; '' if only a directive."""
    comment = _PRAGMA.sub("", comment) if not _PRAGMA.match(comment) else ""
    return comment.lstrip("#").removeprefix(":").strip()
