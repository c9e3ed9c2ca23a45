"""Build the bundled offline sample: Dolly-schema records from CPython's own docstrings.

    python -m distrib_gpt.data.build_sample distrib_gpt/assets/dolly_sample.jsonl

Tests, smoke runs and CI need instruction data without network access. Rather than ship a
copy of someone else's dataset, we derive real, human-written text from documentation that
every Python installation carries: the docstrings of a fixed list of standard-library
modules and their public functions and classes (PSF License). Each record uses one of
Dolly's categories, with question/answer pairs that the docstring honestly supports:

- open_qa:                "What does `json.dumps` do in Python?" -> the docstring's first paragraph
- closed_qa:              context = the docstring; "what does it return / when does it raise"
                          -> the sentence of the docstring that says so
- summarization:          context = a module's (or long function's) docstring
                          -> its summary line/paragraph (by PEP 257 convention, the summary)
- information_extraction: context = signature + docstring; "List the parameters of X"
                          -> the parameter names from the signature
- classification:         "Is `x.y` a function, a class, or a module?" -> which one it is

The output is deterministic for a given Python version (sorted names, no randomness); the
text differs slightly between Python versions, so the version used is recorded in
distrib_gpt/assets/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Iterator

# Modules whose docstrings are platform-independent (no os, socket, signal, ...), sorted.
MODULES = sorted(
    [
        "abc", "argparse", "array", "ast", "base64", "binascii", "bisect", "bz2", "calendar",
        "cmath", "codecs", "collections", "collections.abc", "colorsys", "configparser",
        "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
        "email.utils", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools",
        "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
        "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "io", "ipaddress",
        "itertools", "json", "keyword", "linecache", "logging", "lzma", "math", "mimetypes",
        "numbers", "operator", "optparse", "pathlib", "pickle", "pickletools", "pkgutil",
        "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
        "selectors", "shelve", "shlex", "shutil", "smtplib", "sqlite3", "statistics", "string",
        "stringprep", "struct", "tarfile", "tempfile", "textwrap", "threading", "timeit",
        "token", "tokenize", "tomllib", "traceback", "types", "typing", "unicodedata",
        "unittest", "urllib.parse", "urllib.request", "uu", "uuid", "warnings", "wave",
        "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo",
    ]
)

MIN_DOC_CHARS = 60  # shorter docstrings ("Return self.") say too little to learn from
MAX_CONTEXT_CHARS = 1500  # cap long docstrings used as context (cut at a paragraph)
MAX_ANSWER_CHARS = 600


def _clean(doc: str | None) -> str:
    return inspect.cleandoc(doc) if doc else ""


def _paragraphs(doc: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _join_lines(paragraph: str) -> str:
    return " ".join(line.strip() for line in paragraph.splitlines())


_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"][.!?])\s+(?=[A-Z`'\"(])")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(_join_lines(text)) if s.strip()]


def _looks_like_signature(paragraph: str, name: str) -> bool:
    # Older C docstrings start with "name(arg, ...) -> type"; that is not prose.
    first = paragraph.splitlines()[0]
    return first.startswith(name + "(") or " -> " in first and "(" in first


def _summary(doc: str, name: str) -> str:
    """The first prose paragraph, on one line, capped at a sentence boundary."""
    for p in _paragraphs(doc):
        if _looks_like_signature(p, name) or p.startswith((">>>", "Usage", "usage")):
            continue
        text = _join_lines(p)
        if len(text) <= MAX_ANSWER_CHARS:
            return text
        out = ""
        for s in _sentences(text):
            if out and len(out) + len(s) + 1 > MAX_ANSWER_CHARS:
                break
            out = f"{out} {s}".strip()
        return out[:MAX_ANSWER_CHARS]
    return ""


def _cap(doc: str) -> str:
    """At most MAX_CONTEXT_CHARS, cut at a paragraph boundary when possible."""
    if len(doc) <= MAX_CONTEXT_CHARS:
        return doc
    out = ""
    for p in doc.split("\n\n"):
        if out and len(out) + len(p) + 2 > MAX_CONTEXT_CHARS:
            break
        out = f"{out}\n\n{p}" if out else p
    return out[:MAX_CONTEXT_CHARS]


def _kind(obj: Any) -> str | None:
    if inspect.isclass(obj):
        return "class"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
        return "function"
    return None


def _public_objects(module: types.ModuleType) -> Iterator[tuple[str, Any, str]]:
    """(name, object, kind) of public functions/classes defined in `module`, sorted by name."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        kind = _kind(obj)
        if kind is None or name.startswith("_"):
            continue
        # Skip re-exports (e.g. typing names in collections.abc): document each object once,
        # under the module that defines it. C accelerators (_json, _collections) count as ours.
        home = getattr(obj, "__module__", None) or ""
        if home != module.__name__ and home.lstrip("_") != module.__name__.rsplit(".", 1)[-1]:
            continue
        yield name, obj, kind


def _parameters(obj: Any) -> list[str] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    out = []
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        out.append(prefix + p.name)
    return out


def _first_sentence_with(doc: str, words: tuple[str, ...]) -> str:
    for p in _paragraphs(doc):
        if p.startswith(">>>"):
            continue
        for s in _sentences(p):
            if s.startswith(words) and len(s) <= MAX_ANSWER_CHARS:
                return s
    return ""


def _record(instruction: str, context: str, response: str, category: str) -> dict[str, str]:
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def _public_methods(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods defined (not inherited) in `cls`, with their own docstrings, sorted."""
    for name in sorted(vars(cls)):
        if name.startswith("_"):
            continue
        attr = vars(cls)[name]
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if isinstance(attr, (types.FunctionType, types.MethodDescriptorType, types.BuiltinFunctionType)):
            yield name, attr


def records_for_object(qual: str, name: str, obj: Any, kind: str) -> Iterator[dict[str, str]]:
    """Records about one function, class or (kind "method") method."""
    doc = _clean(getattr(obj, "__doc__", None))
    if len(doc) < MIN_DOC_CHARS:
        return
    summary = _summary(doc, name)
    if len(summary) < 20:
        return
    context = _cap(doc)

    what = "represent" if kind == "class" else "do"
    yield _record(f"What does `{qual}` {what} in Python?", "", summary, "open_qa")

    if kind != "method":  # the question offers function/class/module only
        yield _record(
            f"Is `{qual}` a function, a class, or a module in Python's standard library?",
            "",
            f"`{qual}` is {'a function' if kind == 'function' else 'a class'}.",
            "classification",
        )

    returns = _first_sentence_with(doc, ("Return ", "Returns ", "Return:", "Returns:"))
    if returns:
        yield _record(f"According to this documentation, what does `{qual}` return?", context, returns, "closed_qa")
    raises = _first_sentence_with(doc, ("Raise ", "Raises ", "If ", "An exception"))
    if raises and "rais" in raises.lower():
        yield _record(
            f"According to this documentation, when does `{qual}` raise an exception?", context, raises, "closed_qa"
        )

    params = _parameters(obj)
    if params:
        sig_line = f"{qual}({', '.join(params)})"
        yield _record(
            f"List the parameters of `{qual}`.",
            f"{sig_line}\n\n{context}",
            f"`{qual}` takes {len(params)} parameter{'s' if len(params) != 1 else ''}: "
            + ", ".join(f"`{p}`" for p in params)
            + ".",
            "information_extraction",
        )

    if len(_paragraphs(doc)) >= 3 and len(doc) >= 400:
        yield _record(
            f"Summarize the documentation of `{qual}` in one sentence.",
            context,
            _sentences(summary)[0],
            "summarization",
        )


def records_for_module(modname: str) -> Iterator[dict[str, str]]:
    with warnings.catch_warnings():  # e.g. `uu` warns that it is deprecated; we only read docs
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(modname)
    doc = _clean(module.__doc__)
    if len(doc) >= MIN_DOC_CHARS:
        summary = _summary(doc, modname)
        if len(summary) >= 20:
            yield _record(
                f"Summarize what the `{modname}` module provides, based on its documentation.",
                _cap(doc),
                summary,
                "summarization",
            )
            yield _record(
                f"Is `{modname}` a function, a class, or a module in Python's standard library?",
                "",
                f"`{modname}` is a module.",
                "classification",
            )
    for name, obj, kind in _public_objects(module):
        yield from records_for_object(f"{modname}.{name}", name, obj, kind)
        if kind == "class":
            for mname, method in _public_methods(obj):
                yield from records_for_object(f"{modname}.{name}.{mname}", mname, method, "method")


def build(out: Path) -> tuple[int, int]:
    n = 0
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for modname in MODULES:
            try:
                recs = list(records_for_module(modname))
            except ImportError:  # a module missing from this build of Python (e.g. sqlite3)
                print(f"skipping {modname}: not importable", file=sys.stderr)
                continue
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    return n, out.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output .jsonl path")
    args = parser.parse_args(argv)
    n, size = build(args.out)
    print(f"wrote {n} records ({size / 1e6:.2f} MB) to {args.out} with Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
