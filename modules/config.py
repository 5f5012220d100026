"""Strict YAML -> dataclass configs.

Every tunable number of the toolkit lives in a YAML file and is loaded into a dataclass here.
Loading is strict: an unknown key or a value of the wrong type is a :class:`UserError` that
names the file, the dotted key and what was allowed, instead of being silently ignored or
"fixed". ``--set a.b=value`` overrides are applied to the raw YAML tree before validation, so
they are checked exactly like keys written in the file.

PyYAML implements YAML 1.1, where ``3e-4`` (no dot) is a *string*; :func:`load_yaml` uses a
loader that reads such scientific notation as a float, the way a user means it. The loader is
strict where PyYAML is lenient: a key written twice in one mapping (PyYAML keeps the last one
silently) is an error naming the file, the key and both lines; a syntax error (e.g. a line
indented with a tab, which YAML forbids) names the file, the line and the column.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from modules.errors import UserError

T = TypeVar("T")

_FLOAT_PATTERN = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one mapping: ``key``, and the 1-based lines of both."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(problem=f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _StrictFloatLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` / ``3E5`` as floats (YAML 1.2 behaviour) and refuses a
    mapping that repeats a key (YAML says keys are unique; PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override on purpose
                    continue
                key = self.construct_object(key_node, deep=False)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKeyError(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeConstructor reports it itself
                    continue
        return super().construct_mapping(node, deep=deep)


# Replace the float resolver (YAML 1.1 needs a dot before the exponent).
_StrictFloatLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_StrictFloatLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789."))


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML text strictly (scientific-notation floats, no repeated keys); an error names
    ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_StrictFloatLoader)
    except _DuplicateKeyError as err:
        raise UserError(f"{source}: duplicate key {err.key!r} on line {err.line} (first given on line "
                        f"{err.first_line}); each key may appear once in a mapping") from None
    except yaml.YAMLError as err:
        raise UserError(f"{source}: invalid YAML ({_describe_yaml_error(err, text)})") from None


def _describe_yaml_error(err: yaml.YAMLError, text: str) -> str:
    """PyYAML's error in one line: where (line, column of ``text``) and what, with a hint for tabs."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    if mark is None or problem is None:
        return " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    lines = text.splitlines()
    offending = lines[mark.line] if mark.line < len(lines) else ""
    indent = offending[: len(offending) - len(offending.lstrip(" \t"))]
    if "\t" in indent:
        return f"{where}: indented with a tab; YAML indentation must be spaces"
    if "'\\t'" in problem:
        return f"{where}: a tab where YAML needs spaces (after a colon, or before a value)"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML mapping from ``path``; a missing file or a non-mapping is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    data = parse_yaml_text(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def dump_yaml(data: Mapping[str, Any], path: Union[str, Path]) -> None:
    """Write a plain mapping as YAML (keys in the given order)."""
    Path(path).write_text(yaml.safe_dump(_plain(data), sort_keys=False), encoding="utf-8")


# ----------------------------------------------------------------------------------------
# --set overrides
# ----------------------------------------------------------------------------------------

def parse_override(text: str) -> Tuple[List[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed value)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. training_args.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise UserError(f"--set {text!r}: the key {key!r} is not a dotted key like training_args.learning_rate")
    value = parse_yaml_text(raw, f"--set {text!r}") if raw.strip() else ""
    return parts, value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str], schema: Optional[type] = None) -> Dict[str, Any]:
    """Apply ``--set`` overrides to a raw config tree (in place) and return it.

    When ``schema`` (a dataclass type) is given, every dotted key must name a field of it, so a
    typo in ``--set`` is reported as such (with the allowed keys) rather than as a file error.
    """
    for text in overrides:
        parts, value = parse_override(text)
        if schema is not None:
            _check_key_path(schema, parts, f"--set {text}")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise UserError(f"--set {text}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _check_key_path(schema: type, parts: Sequence[str], source: str) -> None:
    current: Any = schema
    for depth, part in enumerate(parts):
        hint = _unwrap_optional(current)
        if dataclasses.is_dataclass(hint):
            names = [f.name for f in dataclasses.fields(hint)]
            if part not in names:
                where = ".".join(parts[:depth]) or "the top level"
                raise UserError(f"{source}: unknown key {part!r} in {where}; allowed: {', '.join(names)}")
            current = _field_types(hint)[part]
        elif typing.get_origin(hint) in (dict, Dict):
            current = typing.get_args(hint)[1] if typing.get_args(hint) else Any
        else:
            raise UserError(f"{source}: {'.'.join(parts[:depth])!r} is a value, not a section")


# ----------------------------------------------------------------------------------------
# dict -> dataclass
# ----------------------------------------------------------------------------------------

def from_dict(cls: Type[T], data: Mapping[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    Unknown keys, missing required keys and wrongly typed values raise :class:`UserError`
    naming ``source`` (usually the YAML path), the dotted key and what is allowed.
    """
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "the top level"
        raise UserError(f"{source}: {where} must be a mapping of keys, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise UserError(
            f"{source}: unknown key {prefix}{unknown[0]!r} in {where}; allowed: {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], source, f"{prefix}{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"{source}: missing required key {prefix}{name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, UserError) as err:  # __post_init__ validation
        raise UserError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain dicts/lists, ready for YAML or JSON."""
    return _plain(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj)


def load_config(cls: Type[T], path: Union[str, Path], overrides: Sequence[str] = ()) -> T:
    """Load ``path`` into dataclass ``cls`` with ``--set`` overrides applied first."""
    data = load_yaml(path)
    apply_overrides(data, overrides, schema=cls)
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return from_dict(cls, data, source=source)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, List, tuple, Tuple):
        args = typing.get_args(hint)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Dict):
        args = typing.get_args(hint)
        return f"a mapping of {_type_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, source: str, key: str) -> Any:
    def fail() -> None:
        raise UserError(f"{source}: key {key!r} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")

    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, source, key)
            except UserError:
                continue
        fail()
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            fail()
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, prefix=f"{key}.")
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        args = typing.get_args(hint)
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{source}: key {key!r} must have {len(args)} items, got {len(value)}: {value!r}")
            items = [_convert(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_hint = args[0] if args else Any
            items = [_convert(v, item_hint, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin in (tuple, Tuple) else items
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            fail()
        args = typing.get_args(hint)
        value_hint = args[1] if args else Any
        return {str(k): _convert(v, value_hint, source, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail()
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    fail()


def find_config_file(path: Union[str, Path], search_root: Union[str, Path]) -> Path:
    """``path`` as given, or, when it is relative and not in the working directory, under
    ``search_root`` (a script passes its repository folder), so that shipped defaults such as
    ``configs/ldm.yaml`` are found from any folder. A path found nowhere comes back as given, for
    the reader to report."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    beside = Path(search_root) / given
    return beside if beside.exists() else given
