"""The library's types, checked by running mypy on the snippets under ``tests/typing``.

* ``tests/typing/pass/*.py`` must type-check cleanly; ``assert_type`` calls in them pin the types
  that flow through a recipe.
* ``tests/typing/fail/*.py`` must produce exactly the errors marked on their lines with a trailing
  ``# E: <code>`` comment (several codes: ``# E: code-a, code-b``): an expected error that goes
  away fails the test, and so does an unexpected one.

mypy runs in-process (``mypy.api.run``) from the repository root with the project's
``mypy.ini``, so the snippets get the same strict settings and ``mypy_path`` as the code. The
snippet folders are in the config's ``exclude``: that keeps them out of the project-wide run, and
files named explicitly on the command line are checked all the same. mypy runs twice per
session: once on all the pass snippets, once on all the fail snippets (the results are split per
file). Both use the default ``.mypy_cache``, which ``make test``'s mypy run has already warmed.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
import runpy
import tokenize
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import mypy.api
import mypy.errorcodes
import pytest

import typedbrain
from tests.helpers import python_blocks

ROOT: Final = Path(__file__).resolve().parent.parent
SNIPPETS: Final = ROOT / "tests" / "typing"
PASS_FILES: Final = tuple(sorted((SNIPPETS / "pass").glob("*.py")))
FAIL_FILES: Final = tuple(sorted((SNIPPETS / "fail").glob("*.py")))

# Fail snippets whose marked errors mypy does not report yet: each is a hole in the library's
# types. xfail is strict, so once the errors appear this test says so and the entry must go.
KNOWN_GAPS: Final[Mapping[str, str]] = {
    "known_gap_mapping_hparams.py": (
        "mypy ignores the self annotation of Brain.__init__'s mapping overload once the brain's "
        "type arguments are fixed (python/mypy#17916), so a mapping is accepted as hparams for "
        "a brain typed with an attrs class; the brain refuses it at run time instead "
        "(tests/test_hparams.py)"
    ),
}

# Output-only options: they do not change what mypy checks, nor invalidate its cache.
_OUTPUT_OPTIONS: Final = ("--no-pretty", "--show-error-codes", "--error-summary")
# `path:line: severity: message  [code]`, with optional column / end positions after the line.
_DIAGNOSTIC: Final = re.compile(
    r"^(?P<path>.+?):(?P<line>\d+)(?::\d+)*: (?P<severity>error|note|warning): "
    r"(?P<message>.*?)(?:  \[(?P<code>[a-z0-9-]+)\])?$"
)
_CHECKED: Final = re.compile(r"\b(?:in|checked) (?P<count>\d+) source files?\b")
_MARKER: Final = re.compile(r"#\s*E:(?P<codes>.*)$")
_CODE: Final = re.compile(r"[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class Diagnostic:
    """One error line of mypy's output."""

    path: Path
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{_relative(self.path)}:{self.line}: {self.message}  [{self.code}]"


@dataclass(frozen=True)
class MypyRun:
    """What one mypy invocation reported."""

    stdout: str
    stderr: str
    status: int
    errors: tuple[Diagnostic, ...]

    def report(self) -> str:
        return (
            f"exit status {self.status}\n--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )

    def checked_files(self) -> int | None:
        """The number of source files mypy's summary line says it checked."""
        summary = self.stdout.strip().splitlines()[-1:] or [""]
        found = _CHECKED.search(summary[0])
        return None if found is None else int(found["count"])


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _parse(stdout: str) -> tuple[Diagnostic, ...]:
    errors: list[Diagnostic] = []
    for text in stdout.splitlines():
        found = _DIAGNOSTIC.match(text)
        if found is None or found["severity"] != "error":
            continue  # notes, summaries
        path = (ROOT / found["path"]).resolve()
        code = found["code"] or "<no code>"
        errors.append(Diagnostic(path, int(found["line"]), code, found["message"]))
    return tuple(errors)


def run_mypy(files: tuple[Path, ...]) -> MypyRun:
    """Run mypy with the project's config on ``files``, from the repository root."""
    arguments = ["--config-file", "mypy.ini", *_OUTPUT_OPTIONS]
    arguments += [_relative(path) for path in files]
    with contextlib.chdir(ROOT):  # mypy_path and the cache are relative to the working dir
        stdout, stderr, status = mypy.api.run(arguments)
    return MypyRun(stdout, stderr, status, _parse(stdout))


def markers(path: Path) -> dict[int, set[str]]:
    """The ``# E: code[, code...]`` markers of a snippet: line number -> expected codes.

    Comments are found with ``tokenize``, so a ``# E:`` inside a string is not a marker.
    """
    expected: dict[int, set[str]] = {}
    for token in _tokens(path):
        if token.type != tokenize.COMMENT:
            continue
        found = _MARKER.search(token.string)
        if found is None:
            continue
        codes = [code.strip() for code in found["codes"].split(",")]
        bad = [code for code in codes if not _CODE.fullmatch(code)]
        if bad:
            raise ValueError(f"{_relative(path)}:{token.start[0]}: malformed marker {token.string}")
        expected.setdefault(token.start[0], set()).update(codes)
    return expected


def _tokens(path: Path) -> Iterator[tokenize.TokenInfo]:
    return tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)


def _code_lines(path: Path) -> set[int]:
    """Lines holding a token other than a comment or a line break: where mypy can report."""
    ignored = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER}
    ignored |= {tokenize.INDENT, tokenize.DEDENT}
    lines: set[int] = set()
    for token in _tokens(path):
        if token.type not in ignored:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def _pairs(pairs: set[tuple[int, str]]) -> str:
    return ", ".join(f"{line}:{code}" for line, code in sorted(pairs)) or "none"


@pytest.fixture(scope="module")
def pass_run() -> MypyRun:
    return run_mypy(PASS_FILES)


@pytest.fixture(scope="module")
def fail_run() -> MypyRun:
    return run_mypy(FAIL_FILES)


# ----------------------------------------------------------------------------------------------
# (a) the pass snippets


def test_pass_snippets_type_check_cleanly(pass_run: MypyRun) -> None:
    assert PASS_FILES, "no snippets in tests/typing/pass"
    if pass_run.errors or pass_run.status != 0:
        pytest.fail("mypy rejects the pass snippets:\n" + pass_run.report(), pytrace=False)
    # Explicit files are checked although mypy.ini excludes their folder: the summary counts them.
    assert pass_run.checked_files() == len(PASS_FILES), pass_run.report()


# ----------------------------------------------------------------------------------------------
# (b) the fail snippets


@pytest.mark.parametrize(
    "path", [path for path in FAIL_FILES if path.name not in KNOWN_GAPS], ids=lambda p: p.name
)
def test_fail_snippet_reports_exactly_the_marked_errors(path: Path, fail_run: MypyRun) -> None:
    assert fail_run.status in {0, 1}, fail_run.report()  # 2: mypy itself failed
    expected = {(line, code) for line, codes in markers(path).items() for code in codes}
    errors = [error for error in fail_run.errors if error.path == path.resolve()]
    reported = {(error.line, error.code) for error in errors}
    missing, unexpected = expected - reported, reported - expected
    if missing or unexpected:
        pytest.fail(
            f"{_relative(path)}\n"
            f"  expected but not reported (line:code): {_pairs(missing)}\n"
            f"  reported but not expected (line:code): {_pairs(unexpected)}\n"
            "mypy's errors for this file:\n" + "\n".join(f"  {error}" for error in errors),
            pytrace=False,
        )


def test_fail_run_reports_nothing_outside_the_snippets(fail_run: MypyRun) -> None:
    snippets = {path.resolve() for path in FAIL_FILES}
    elsewhere = [str(error) for error in fail_run.errors if error.path not in snippets]
    assert not elsewhere, "\n".join(elsewhere)
    assert fail_run.checked_files() == len(FAIL_FILES), fail_run.report()


@pytest.mark.parametrize("name", sorted(KNOWN_GAPS))
def test_known_gap_is_still_invisible_to_mypy(name: str, fail_run: MypyRun) -> None:
    """The gap is real today; once mypy reports its marked errors, make it a fail snippet."""
    path = SNIPPETS / "fail" / name
    errors = [str(error) for error in fail_run.errors if error.path == path.resolve()]
    assert markers(path), f"{name} marks no expected error"
    assert errors == [], (
        f"mypy now reports errors in the known gap {name} ({KNOWN_GAPS[name]}): remove it from "
        "KNOWN_GAPS so the exact-errors test checks it\n" + "\n".join(errors)
    )


def test_known_gaps_name_existing_snippets() -> None:
    assert set(KNOWN_GAPS) <= {path.name for path in FAIL_FILES}


# ----------------------------------------------------------------------------------------------
# (c) guards on the snippets themselves (no mypy run)


@pytest.mark.parametrize("path", FAIL_FILES, ids=lambda path: path.name)
def test_fail_snippet_markers_are_well_formed(path: Path) -> None:
    expected = markers(path)
    assert expected, f"{_relative(path)} has no '# E: <code>' marker"
    code_lines = _code_lines(path)
    total = len(path.read_text(encoding="utf-8").splitlines())
    known = set(mypy.errorcodes.error_codes)
    for line, codes in expected.items():
        assert 1 <= line <= total
        assert line in code_lines, f"{_relative(path)}:{line}: marker on a line without code"
        unknown = codes - known
        assert not unknown, f"{_relative(path)}:{line}: not mypy error codes: {sorted(unknown)}"


@pytest.mark.parametrize(
    "path", PASS_FILES + FAIL_FILES, ids=lambda path: path.parent.name + "/" + path.name
)
def test_snippet_is_valid_python_and_not_collected(path: Path) -> None:
    # A syntax error is a blocking error: mypy would check none of the other snippets.
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    collected = path.name.startswith("test_") or path.name.endswith("_test.py")
    assert not collected, f"{_relative(path)}: pytest would collect this snippet as a test module"
    if path in PASS_FILES:
        assert not markers(path), f"{_relative(path)}: a pass snippet has '# E:' markers"


@pytest.mark.parametrize(
    ("page", "snippet"),
    [("docs/typing.md", "docs_typing_example.py"), ("README.md", "readme_example.py")],
)
def test_documented_example_is_a_checked_pass_snippet(page: str, snippet: str) -> None:
    """The first Python block of each page is type-checked (and run) as a pass snippet."""
    block = python_blocks(page)[0]
    assert (SNIPPETS / "pass" / snippet).read_text() == block


@pytest.mark.parametrize("snippet", ["docs_typing_example.py", "readme_example.py"])
def test_documented_example_runs(snippet: str) -> None:
    runpy.run_path(str(SNIPPETS / "pass" / snippet))


def test_the_configuration_pages_typed_hparams_example_is_a_checked_pass_snippet() -> None:
    """The example hands its structured ``opt_class`` to a brain: mypy checks that it fits."""
    blocks = [
        block for block in python_blocks("docs/configuration.md") if "structure_hparams(" in block
    ]
    assert len(blocks) == 1
    assert (SNIPPETS / "pass" / "docs_configuration_typed_hparams.py").read_text() == blocks[0]


def _public_functions() -> list[object]:
    """Every public function, and every method a public class defines, named by its path."""
    found: list[object] = []
    for name in typedbrain.__all__:
        value = getattr(typedbrain, name)
        if inspect.isfunction(value):
            found.append(pytest.param(value, id=name))
        elif inspect.isclass(value):
            found += [
                pytest.param(member, id=f"{name}.{attribute}")
                for attribute, member in vars(value).items()
                if inspect.isfunction(member)
            ]
    return found


@pytest.mark.parametrize("function", _public_functions())
def test_the_annotations_of_every_public_function_resolve_at_run_time(function: object) -> None:
    # What typing.get_type_hints, and the tools built on it (cattrs, documentation
    # generators, runtime checkers), need: no name imported only under TYPE_CHECKING.
    assert isinstance(typing.get_type_hints(function), dict)
