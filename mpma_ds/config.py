"""The one config engine: YAML + ``--set a.b=c`` overrides → nested typed dataclasses, validated once.

Every section of a recipe (``model``, ``data``, ``train``, ``tracking``, ``task``, ``init``) and the model's own
``MPMAConfig`` is a plain dataclass that derives from ``ConfigSection`` and keeps only its *value* rules (in
``validate()``); this module owns everything else (torchtitan ``config/manager.py``: parse → merge → validate
once):

- ``build(cls, values, prefix=..., source=...)``: a mapping → an instance of ``cls``; nested sections are built
  recursively; an unknown key or a value of the wrong type is one ``ConfigError`` line that names the dotted
  key (``train.lr``) and the file it came from;
- type checks and light coercions (``3e-4`` read by YAML as a string → float, ``2`` → ``2.0`` for a float
  field, a list → tuple; NaN and ±inf are refused in every float field) also run when a section is
  constructed directly in Python (``MPMAConfig(vocab_size="x")`` fails the same way), because
  ``ConfigSection.__post_init__`` runs them;
- ``load_yaml`` / ``apply_overrides`` / ``load_config``: the file and the ``--set`` overrides merged into one
  tree before anything is built; an empty file is refused as empty;
- ``to_dict`` / ``save_config``: the resolved config as plain YAML-safe data (the run folder's
  ``recipe.yaml``), which ``load_config`` reads back to an equal config.

This module imports nothing from the rest of ``mpma_ds``.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, bad value, missing or empty file.

    The message is one line: what is wrong, the dotted key, and the file when there is one.
    """


class ConfigSection:
    """Base of every config dataclass.

    Subclasses are ``@dataclass`` classes with a docstring under each field; they may define ``validate()``
    for value rules (raise ``ValueError`` with a message naming the field) and set ``SECTION`` to the dotted
    name their messages use (``"train"``). Types are checked, and lightly coerced, before ``validate()`` runs.
    """

    SECTION: ClassVar[str] = ""
    OPEN: ClassVar[str] = ""
    """The name of a ``dict`` field holding *open* subsections: keys beyond the fixed fields whose classes
    ``open_sections()`` names (e.g. ``task.<option section>`` of whichever tasks are registered). In YAML they
    sit beside the fixed keys; ``to_dict`` writes them back there."""

    @classmethod
    def open_sections(cls) -> Mapping[str, type]:
        """The open subsections this section accepts, by key (with ``OPEN`` set)."""
        return {}

    def __post_init__(self) -> None:
        check_types(self, prefix=self.SECTION)
        self.validate()

    def validate(self) -> None:
        """Value rules of this section (override); raise ``ValueError`` naming the field."""

    def key(self, name: str) -> str:
        """The dotted name of field ``name`` for messages (``train.lr``)."""
        return f"{self.SECTION}.{name}" if self.SECTION else name


# --------------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    cached = _HINTS.get(cls)
    if cached is None:
        cached = _HINTS[cls] = typing.get_type_hints(cls)
    return cached


_HINTS: dict[type, dict[str, Any]] = {}


def convert(value: Any, tp: Any, key: str, *, source: str | None = None, what: str = "") -> Any:
    """``value`` checked against the annotation ``tp`` and lightly coerced; a mismatch raises ``ConfigError``
    naming ``key`` (and ``source``). ``what`` names the kind of file in unknown-key messages ("recipe")."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, key, source=source, what=what)
            except ConfigError as err:
                errors.append(err)
        if errors:
            raise errors[0]
        raise ConfigError(_where(f"{key}: null is not allowed", source))
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(_where(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}", source))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(_where(f"{key} must be a mapping of keys, got {value!r}", source))
        return build(tp, value, prefix=key, source=source, what=what)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(_where(f"{key} must be true or false, got {value!r}", source))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(_where(f"{key} must be an integer, got {value!r}", source))
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(_where(f"{key} must be a number, got {value!r}", source))
        if not math.isfinite(number):  # .nan / .inf would reach the optimiser or a schedule as poison
            raise ConfigError(_where(f"{key} must be a finite number, got {value!r}", source))
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(_where(f"{key} must be a string, got {value!r}", source))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(_where(f"{key} must be a mapping, got {value!r}", source))
        return dict(value)
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # one value where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(_where(f"{key} must be a list, got {value!r}", source))
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if fixed and len(args) != len(value):
            raise ConfigError(_where(f"{key} must have {len(args)} values, got {list(value)}", source))
        inner = args[0] if args else Any
        items = [
            convert(v, args[i] if fixed else inner, key, source=source, what=what) for i, v in enumerate(value)
        ]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(_where(f"{key} must be {_type_name(tp)}, got {value!r}", source))
    return value


def check_types(obj: Any, *, prefix: str = "", source: str | None = None) -> None:
    """Check (and coerce in place) every init field of the dataclass instance ``obj`` against its annotation."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}.{_key_name(f.name)}" if prefix else _key_name(f.name)
        converted = convert(value, hints[f.name], key, source=source)
        if converted is not value:
            object.__setattr__(obj, f.name, converted)


def _where(message: str, source: str | None) -> str:
    return f"{message} (in {source})" if source else message


def build(
    cls: type[T], values: Mapping[str, Any], *, prefix: str = "", source: str | None = None, what: str = ""
) -> T:
    """Build dataclass ``cls`` from ``values``.

    Unknown keys and wrong types raise ``ConfigError`` naming ``prefix.key`` and ``source``; the value rules of
    the section (``validate()`` / ``__post_init__``) raising ``ValueError``/``TypeError`` become a
    ``ConfigError`` too, with the source appended. Which keys were given explicitly is kept as
    ``given_keys(instance)``.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(_where(f"{prefix or 'the config'} must be a mapping of keys, got {values!r}", source))
    hints = _hints(cls)
    values = {_field_name(str(k)): v for k, v in values.items()}
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != getattr(cls, "OPEN", "")}
    open_values: dict[str, Any] = {}
    if getattr(cls, "OPEN", ""):
        open_classes = cls.open_sections()  # type: ignore[attr-defined]
        open_values = {k: values[k] for k in values if k not in known and k in open_classes}
        known.update({k: None for k in open_classes})  # listed among the valid keys
    unknown = sorted(_key_name(k) for k in set(values) - set(known))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        where = f" in {prefix}" if prefix else ""
        kind = f"{what} key" if what else "key"
        valid = ", ".join(sorted(map(_key_name, known)))
        raise ConfigError(_where(f"unknown {kind} {names}; valid keys{where}: {valid}", source))
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}.{_key_name(name)}" if prefix else _key_name(name)
        if name in open_values:
            kwargs.setdefault(cls.OPEN, {})[name] = convert(
                value, open_classes[name], key, source=source, what=what
            )  # type: ignore[attr-defined]
        else:
            kwargs[name] = convert(value, hints[name], key, source=source, what=what)
    try:
        # the given keys are set before __init__ runs the value rules, which may ask for them (task.<other>)
        instance = cls.__new__(cls)
        object.__setattr__(instance, "_given_keys", frozenset(map(_key_name, values)))
        instance.__init__(**kwargs)
    except ConfigError as err:
        if source and source not in str(err):
            raise ConfigError(_where(str(err), source)) from err
        raise
    except (TypeError, ValueError) as err:
        message = str(err).strip("'\"")
        if prefix and prefix.split(".")[0] not in message:
            message = f"{prefix}: {message}"
        raise ConfigError(_where(message, source)) from err
    return instance


def _field_name(key: str) -> str:
    """A config key as its field name: a Python keyword gets a trailing underscore (``from`` -> ``from_``)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _key_name(name: str) -> str:
    """A field name as its config key (``from_`` -> ``from``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def given_keys(instance: Any) -> frozenset[str]:
    """The keys that were given explicitly when ``build`` made ``instance`` (empty for direct construction)."""
    return getattr(instance, "_given_keys", frozenset())


# --------------------------------------------------------------------------------------------- files, overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` → ``(["train", "lr"], "3e-4")``; the value is read as YAML (``[1, 2]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value (e.g. --set train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from err
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each ``a.b=c`` in the nested dict ``tree`` (in place; returns it). Unknown keys are caught when the
    tree is built, except under free-form mappings (``model.overrides``)."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[: depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def load_yaml(path: str | os.PathLike[str], *, what: str = "recipe", hint: str = "") -> dict[str, Any]:
    """Read a YAML file that must hold a non-empty mapping; ``ConfigError`` naming the file otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist{'; ' + hint if hint else ''}")
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {file} is not valid YAML: {' '.join(str(err).split())}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {file} cannot be read: {err}") from err
    if loaded is None or loaded == {}:
        raise ConfigError(f"{what} {file} is empty; it must hold sections (model, data, train, ...)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {file} must be a mapping of sections (model, data, train, ...)")
    return loaded


def load_config(
    cls: type[T], path: str | os.PathLike[str] | None, overrides: Iterable[str] = (), *, what: str = "recipe"
) -> T:
    """Parse ``path`` (``None``: all defaults), merge ``overrides``, build ``cls`` once."""
    overrides = list(overrides)
    tree: dict[str, Any] = load_yaml(path, what=what) if path is not None else {}
    tree = apply_overrides(tree, overrides)
    source = str(path) if path is not None else None
    try:
        return build(cls, tree, source=source, what=what)
    except ConfigError as err:
        raise blame_override(err, overrides, source) from err


def blame_override(err: ConfigError, overrides: Iterable[str], source: str | None) -> ConfigError:
    """``err`` saying ``(from --set key=value)`` instead of ``(in FILE)`` when its key came from ``--set``: the
    file does not hold the bad value, the command line does."""
    message = str(err)
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key and (message.startswith((f"{key} ", f"{key}:")) or f"key {key};" in message):
            if source and message.endswith(f" (in {source})"):
                message = message[: -len(f" (in {source})")]
            return ConfigError(f"{message} (from --set {text})")
    return err


# --------------------------------------------------------------------------------------------- back to plain data


def to_dict(value: Any) -> Any:
    """A config as plain nested dicts/lists/scalars (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        open_field = getattr(value, "OPEN", "")
        out = {_key_name(f.name): to_dict(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if open_field:  # open subsections sit beside the fixed keys, as they were given
            out.update(out.pop(open_field))
        return out
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_dict(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(config: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``to_dict(config)`` as YAML, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read from the source: for ``--help`` and docs."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                if isinstance(following.value.value, str):
                    docs[node.target.id] = " ".join(following.value.value.split())
    return docs
