"""The public API is exactly what ``typedbrain.__all__`` lists, each name documented."""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import pkgutil
import re
from pathlib import Path

import typedbrain
from typedbrain._cli_args import run_options_help
from typedbrain._data import set_loader_epoch
from typedbrain._loader_workers import seed_worker
from typedbrain._train_log import format_stat


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(typedbrain) if not name.startswith("_")}
    # Submodules appear as attributes once imported; they are private (underscored) or not ours.
    public -= {name for name in public if inspect.ismodule(getattr(typedbrain, name))}
    assert set(typedbrain.__all__) - {"__version__"} == public


def test_all_has_no_duplicates() -> None:
    assert len(set(typedbrain.__all__)) == len(typedbrain.__all__)


def test_every_module_of_the_package_is_private() -> None:
    names = [module.name for module in pkgutil.iter_modules(typedbrain.__path__)]
    assert names
    assert all(name.startswith("_") for name in names), names


def test_every_public_class_and_function_has_a_docstring() -> None:
    for name in typedbrain.__all__:
        value = getattr(typedbrain, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name


def test_public_names_come_from_their_defining_module() -> None:
    for name in typedbrain.__all__:
        value = getattr(typedbrain, name)
        module = getattr(value, "__module__", None)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert module is not None
            assert module.startswith("typedbrain._"), (name, module)
            assert getattr(importlib.import_module(module), name) is value


def test_every_public_method_of_brain_is_documented() -> None:
    for name, member in inspect.getmembers(typedbrain.Brain):
        if not name.startswith("_") and (
            inspect.isfunction(member) or isinstance(member, property)
        ):
            assert inspect.getdoc(member), name


def test_package_ships_its_type_information() -> None:
    assert importlib.resources.files("typedbrain").joinpath("py.typed").is_file()


def test_version_is_a_string() -> None:
    assert isinstance(typedbrain.__version__, str)
    assert typedbrain.__version__[0].isdigit()


def test_the_helpers_the_docs_call_are_exported() -> None:
    docs = Path(__file__).parent.parent / "docs"
    defined: dict[str, object] = {}
    for module in pkgutil.iter_modules(typedbrain.__path__):
        loaded = importlib.import_module(f"typedbrain.{module.name}")
        for name in getattr(loaded, "__all__", ()):
            defined.setdefault(name, getattr(loaded, name))
    for page in sorted(docs.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        called = set(re.findall(r"`([A-Za-z_]\w*)\(", text))
        for name in sorted(called & defined.keys()):
            assert getattr(typedbrain, name, None) is defined[name], (page.name, name)
    # Named by docs/data-order.md as what prepares a loader for an epoch and seeds its workers.
    assert typedbrain.set_loader_epoch is set_loader_epoch
    assert typedbrain.seed_worker is seed_worker
    assert typedbrain.run_options_help is run_options_help
    assert typedbrain.format_stat is format_stat


def test_the_api_page_lists_every_public_name_once_and_nothing_else() -> None:
    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([A-Za-z_]+)` \|", page, flags=re.MULTILINE)
    assert sorted(listed) == sorted(typedbrain.__all__)


def test_the_api_pages_links_reach_existing_pages_and_headings() -> None:
    docs = Path(__file__).parent.parent / "docs"
    page = (docs / "api.md").read_text(encoding="utf-8")
    for target, anchor in set(re.findall(r"\]\(([a-z-]+\.md)(?:#([a-z0-9-]+))?\)", page)):
        text = (docs / target).read_text(encoding="utf-8")
        if anchor:
            headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
            slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, (target, anchor)


def test_the_training_loop_pages_example_runs() -> None:
    from tests.helpers import python_blocks

    (block,) = python_blocks("docs/training-loop.md")
    exec(compile(block, "docs/training-loop.md", "exec"), {})  # our own docs page
