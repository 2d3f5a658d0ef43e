import re
from collections.abc import Callable, Mapping, MutableMapping
from io import StringIO
from pathlib import Path
from typing import Any, ClassVar, Never, Protocol, TypeAlias, TypeVar, overload, type_check_only

from _typeshed import SupportsRead, SupportsWrite
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import BaseRepresenter

_K = TypeVar("_K")
_V = TypeVar("_V")

# Input accepted by ruamel.yaml's ``YAML.load``: YAML text (a ``str`` is the
# document itself, never a file name), raw bytes, anything with ``read()``,
# or a ``pathlib.Path`` (opened by ruamel; any other path-like is rejected).
_YAMLStream: TypeAlias = str | bytes | SupportsRead[str] | SupportsRead[bytes] | Path

# Overrides are either a YAML-formatted string or a (nested) mapping.
_Overrides: TypeAlias = Mapping[str, object] | str

@type_check_only
class _TextSink(Protocol):
    # ruamel.yaml writes ``str`` only to streams that have an ``encoding``
    # attribute; to any other stream it writes UTF-8 encoded ``bytes``.
    @property
    def encoding(self) -> str | None: ...
    def write(self, s: str, /) -> object: ...

@type_check_only
class _LoaderInstance(Protocol):
    def get_single_data(self) -> object: ...
    def dispose(self) -> None: ...

@type_check_only
class _LoaderClass(Protocol):
    # A loader *class* (e.g. ``ruamel.yaml.loader.Loader``, ``yaml.Loader``):
    # HyperPyYAML registers its tags on it, then PyYAML's ``yaml.load``
    # instantiates it with the resolved stream.
    def __call__(self, stream: StringIO, /) -> _LoaderInstance: ...
    def add_constructor(
        self, tag: str, constructor: Callable[[object, object], object]
    ) -> object: ...
    def add_multi_constructor(
        self, tag_prefix: str, multi_constructor: Callable[[object, str, object], object], /
    ) -> object: ...
    def add_implicit_resolver(self, tag: str, regexp: re.Pattern[str], /, first: str) -> object: ...

# Any: the result is a heterogeneous, user-defined structure (objects built by
# !new:/!name:/!apply: tags) whose values recipes pass straight to torch APIs.
def load_hyperpyyaml(
    yaml_stream: _YAMLStream,
    overrides: _Overrides | None = None,
    overrides_must_match: bool = True,
    loader: _LoaderClass = ...,
) -> dict[str, Any]: ...

class RefTag:
    yaml_tag: ClassVar[str]
    ref_str: str
    def __init__(self, ref_str: str) -> None: ...
    @classmethod
    def to_yaml(cls, representer: BaseRepresenter, node: RefTag) -> ScalarNode: ...

class Placeholder:
    yaml_tag: ClassVar[str]
    @classmethod
    def to_yaml(cls, representer: BaseRepresenter, node: object) -> ScalarNode: ...

# The runtime forwards ``*args, **kwargs`` to ``ruamel.yaml.YAML.dump(data,
# stream, *, transform=None)``: no extra positional argument is accepted
# (hence ``*args: Never``) and ``transform`` is the only keyword. ``transform``
# receives the dumped text and its result is written to ``output_stream``.
@overload
def dump_hyperpyyaml(
    yaml_tree: object,
    output_stream: _TextSink | Path,
    *args: Never,
    transform: Callable[[str], str] | None = None,
) -> None: ...
@overload
def dump_hyperpyyaml(
    yaml_tree: object,
    output_stream: SupportsWrite[bytes],
    *args: Never,
    transform: Callable[[str], bytes] | None = None,
) -> None: ...
def resolve_references(
    yaml_stream: _YAMLStream,
    overrides: _Overrides | None = None,
    overrides_must_match: bool = False,
) -> StringIO: ...
def deref(ref: str, full_tree: Mapping[str, object], copy_mode: bool = False) -> object: ...
def recursive_resolve(
    reference: object,
    reference_list: list[str],
    full_tree: Mapping[str, object],
    copy_mode: bool = False,
) -> object: ...
def parse_arithmetic(reference_string: str) -> object: ...
def recursive_update(
    d: MutableMapping[_K, _V], u: Mapping[_K, _V], must_match: bool = False
) -> None: ...
