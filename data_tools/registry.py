"""Name -> component registries, filled where each component is defined and by installed plugins.

timm's ``@register_model`` is the model: a component registers itself with a decorator in the module that defines
it, beside its options dataclass; nothing else lists it. A registry knows the modules that hold the project's own
components (``builtins``, imported on the first look-up, so naming one never imports the others' dependencies
before it is needed) and the Python entry-point group through which other packages add theirs::

    # a lab's own package, pyproject.toml
    [project.entry-points."mpma_ds.tasks"]
    view_position = "my_lab.view_task"      # importing the module registers the task

An entry point names a module (importing it registers its components) or an object (registered under the entry
point's name when the import did not register it). A name asked for that is not registered is one
``RegistryError`` line listing what is, plugins included.

Stdlib only: ``data_tools`` (which never imports ``mpma_ds``) and every layer of ``mpma_ds`` use it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

__all__ = ["Entry", "Registry", "RegistryError"]

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, a name registered twice, or a plugin that cannot be loaded: one line."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component."""

    name: str
    obj: T
    """The class or factory."""
    options: type | None = None
    """Its options dataclass (a ``ConfigSection`` for recipe sections), when it has one."""
    module: str = ""
    """The module that registered it."""
    plugin: str = ""
    """The distribution that brought it through an entry point ("" for the project's own)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What else the registry's users read (e.g. the recipe sections a task reads)."""


class Registry(Generic[T]):
    """Components of one kind (``kind``: "task", "source format" ...) by name.

    Args:
        kind: what the names name, for messages ("task").
        group: the entry-point group plugins register through (``mpma_ds.tasks``).
        builtins: the project's modules that register components of this kind when imported.
    """

    def __init__(self, kind: str, group: str, builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.group = group
        self._builtins = builtins
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False
        self._loading = False
        self._plugin_errors: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ registering
    def register(self, name: str | None = None, *, options: type | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the decorated class/function under ``name`` (default: its ``name`` attribute,
        else its ``__name__``) with its options dataclass and any ``meta`` the registry's users read."""

        def decorate(obj: T) -> T:
            self.add(name or getattr(obj, "name", "") or obj.__name__, obj, options=options, **meta)  # type: ignore[attr-defined]
            return obj

        return decorate

    def add(self, name: str, obj: T, *, options: type | None = None, plugin: str = "", **meta: Any) -> None:
        """Register ``obj`` under ``name``; the same object again is a no-op (a module imported twice)."""
        module = getattr(obj, "__module__", "") or ""
        old = self._entries.get(name)
        if old is not None:
            if old.obj is obj or (
                old.module == module and getattr(old.obj, "__qualname__", None) == getattr(obj, "__qualname__", "")
            ):
                return
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice: by {old.module or old.plugin} and by {module}; "
                "rename one of them"
            )
        plugin = plugin or _plugin_of(module)
        self._entries[name] = Entry(name, obj, options, module, plugin, dict(meta))

    # ------------------------------------------------------------------------------------------ looking up
    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self._builtins:
                importlib.import_module(module)
            for ep in entry_points(group=self.group):
                before = set(self._entries)
                try:
                    loaded = ep.load()
                except Exception as err:  # a broken plugin must not take the project's own components down
                    self._plugin_errors[ep.name] = f"{type(err).__name__}: {err}"
                    continue
                dist = ep.dist.name if ep.dist is not None else ep.value
                if set(self._entries) == before and not isinstance(loaded, type(sys)):
                    self.add(ep.name, loaded, plugin=dist)
            self._loaded = True
        finally:
            self._loading = False

    def get(self, name: str) -> Entry[T]:
        """The entry of ``name``.

        Raises:
            RegistryError: ``name`` is not registered (the message lists what is, and broken plugins).
        """
        self._load()
        entry = self._entries.get(name)
        if entry is None:
            raise RegistryError(f"unknown {self.kind} {name!r}; {self.describe()}")
        return entry

    def __getitem__(self, name: str) -> T:
        return self.get(name).obj

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._load()
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        """Registered names, the project's own first (in registration order), then plugins'."""
        self._load()
        own = [n for n, e in self._entries.items() if not e.plugin]
        return own + [n for n, e in self._entries.items() if e.plugin]

    def describe(self) -> str:
        """'registered: a, b, c (plugin: d from pkg)' for messages."""
        self._load()
        own = [n for n, e in self._entries.items() if not e.plugin]
        plugins = [f"{n} (plugin {e.plugin})" for n, e in self._entries.items() if e.plugin]
        text = f"registered {self.kind}s: {', '.join(own + plugins) or 'none'}"
        if self._plugin_errors:
            broken = "; ".join(f"{n}: {why}" for n, why in sorted(self._plugin_errors.items()))
            text += f"; plugins that failed to load ({self.group}): {broken}"
        return text


def _plugin_of(module: str) -> str:
    """The distribution a module belongs to, when it is not this project's ("" for ours)."""
    top = module.split(".")[0]
    if top in ("mpma_ds", "data_tools", "__main__", ""):
        return ""
    try:
        from importlib.metadata import packages_distributions

        dists = packages_distributions().get(top, [])
    except Exception:  # metadata of a broken install: the module name is still a fair label
        dists = []
    return dists[0] if dists else top
