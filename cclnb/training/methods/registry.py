"""Which continual methods exist, and how a config names one and sets its options.

A method is a `Method` subclass in a file of its own. cclnb finds methods in three places, in this
order, all through the same loader (`load`):

1. the built-in ones, listed below as "module:Class" specs (the authors' four, CaSSLe, LUMP);
2. installed packages that declare an entry point in the group `cclnb.methods`
   (`[project.entry-points."cclnb.methods"] mymethod = "mypkg.mymethod:MyMethod"`);
3. `TrainConfig.method_module` (`cclnb train --method-module`, `cclnb study --method-module`,
   the notebooks' `method_module` parameter): a `.py` file, or "package.module[:Class]". Because
   it is part of the config, every process of a run (notebook kernels, torchrun workers, the
   report) loads the same file.

`resolve(config)` is the one place a config meets its method: the name made canonical (aliases,
variants), the variant's switches set, the method's option defaults filled and checked, options
of other methods dropped (a preset shares one parameter set among its methods) and unknown names
refused. Every entry point calls it before a run starts; it is idempotent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from cclnb.config import TrainConfig
from cclnb.errors import ConfigError
from cclnb.training.methods.base import Method

BUILTIN = ("cclnb.training.methods.finetuning:Finetuning",
           "cclnb.training.methods.simple_replay:SimpleReplay",
           "cclnb.training.methods.ccl:CCL",
           "cclnb.training.methods.joint:Joint",
           "cclnb.training.methods.cassle:CaSSLe",
           "cclnb.training.methods.lump:LUMP")
ENTRY_POINT_GROUP = "cclnb.methods"

_CLASSES: dict[str, type[Method]] = {}      # canonical name -> class, in registration order
_LOADED: set[str] = set()                   # specs (and files) already loaded
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


# ----------------------------------------------------------------------------- registering
def option_fields(cls: type[Method]) -> tuple[dataclasses.Field, ...]:
    """The declared options of a method class (none without `Options`)."""
    return dataclasses.fields(cls.Options) if cls.Options is not None else ()


def option_types(cls: type[Method]) -> dict[str, Any]:
    """Option name -> its annotation, evaluated (modules with `from __future__ import annotations`
    keep them as text)."""
    return typing.get_type_hints(cls.Options) if cls.Options is not None else {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class (usable as a decorator). Refuses what would make a name ambiguous: a
    second class under a taken name or alias, or an option whose name a config field or another
    method already uses (options are flat names in config.json and on the command line)."""
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise ConfigError(f"{cls!r} is not a cclnb method: subclass cclnb.training.methods.base.Method")
    if _CLASSES.get(cls.name) is cls:
        return cls
    if cls.Options is not None and not dataclasses.is_dataclass(cls.Options):
        raise ConfigError(f"method {cls.name}: Options must be a dataclass (its fields are the options)")
    taken = {n.lower(): owner for owner in _CLASSES.values() for n in _names(owner)}
    for name in _names(cls):
        if name.lower() in taken:
            raise ConfigError(f"method {cls.__module__}.{cls.__qualname__} takes the name {name!r}, "
                              f"which {taken[name.lower()].__qualname__} already has; rename one of them")
    owners = option_owners()
    for f in option_fields(cls):
        if f.name in _CONFIG_FIELDS or f.name in owners:
            other = "a TrainConfig field" if f.name in _CONFIG_FIELDS else f"method {owners[f.name].name}"
            raise ConfigError(f"method {cls.name}: option {f.name!r} is already {other}; prefix the "
                              f"option with the method's name (e.g. {cls.name.lower()}_{f.name})")
    declared = {f.name for f in option_fields(cls)}
    for variant, switches in cls.variants.items():
        if set(switches) - declared:
            raise ConfigError(f"method {cls.name}: variant {variant} sets {sorted(set(switches) - declared)}, "
                              f"which are not options of {cls.name}")
    _CLASSES[cls.name] = cls
    return cls


def _names(cls: type[Method]) -> tuple[str, ...]:
    return (cls.name, *cls.variants, *cls.aliases)


def load(spec: str) -> list[type[Method]]:
    """Register the method(s) a spec names: "path/to/file.py", "package.module:Class" or
    "package.module" (every Method subclass defined in it). Loading a spec twice is a no-op."""
    if spec in _LOADED:
        return []
    if spec.endswith(".py") or "/" in spec:
        module = _module_from_file(Path(spec))
        found = _classes_in(module)
    else:
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"method module {module_name!r} cannot be imported ({error}); give a .py "
                              f"file or a module on the Python path (package.module[:Class])") from error
        if attribute:
            if not hasattr(module, attribute):
                raise ConfigError(f"method spec {spec!r}: {module_name} has no {attribute!r}")
            found = [getattr(module, attribute)]
        else:
            found = _classes_in(module)
    if not found:
        raise ConfigError(f"method spec {spec!r} defines no cclnb method (a subclass of "
                          f"cclnb.training.methods.base.Method with its own `name`)")
    classes = [register(cls) for cls in found]
    _LOADED.add(spec)
    return classes


def _module_from_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"method file {path} not found; pass the path of a .py file that defines "
                          f"a cclnb method")
    name = f"cclnb_method_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module     # dataclasses and pickling look classes up through sys.modules
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _classes_in(module: ModuleType) -> list[type[Method]]:
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Method) and obj.__module__ == module.__name__
            and "name" in vars(obj)]


def _ensure_loaded() -> None:
    """The built-ins, then every installed entry point of the group (once per process)."""
    if "builtin" in _LOADED:
        return
    for spec in BUILTIN:
        load(spec)
    _LOADED.add("builtin")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        load(entry.value)


# ----------------------------------------------------------------------------- looking up
def classes() -> dict[str, type[Method]]:
    """Every registered method class by canonical name, built-ins first."""
    _ensure_loaded()
    return dict(_CLASSES)


def study_methods() -> tuple[str, ...]:
    """Every name a study can run: each method, then its variants."""
    return tuple(n for cls in classes().values() for n in (cls.name, *cls.variants))


def canonical_name(name: str, method_module: str | None = None) -> str:
    """A method's canonical name (or its variant's) from any accepted spelling: the name, an
    alias (the authors' README writes CCL as `CLL`), or either in another case."""
    if method_module:
        load(method_module)
    registered = classes()
    spellings = {n: n for cls in registered.values() for n in (cls.name, *cls.variants)}
    spellings.update({a: cls.name for cls in registered.values() for a in cls.aliases})
    if name in spellings:
        return spellings[name]
    folded = {k.lower(): v for k, v in spellings.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(study_methods())} (CLL is "
                      f"accepted for CCL), or load yours with --method-module FILE.py (docs/methods.md)")


def method_class(name: str) -> type[Method]:
    """The class that trains `name` (a variant trains as its method, its switches set)."""
    canonical = canonical_name(name)
    return next(cls for cls in classes().values() if canonical == cls.name or canonical in cls.variants)


def variant_bases() -> dict[str, str]:
    """Every variant (CCL's ablations) -> the method it varies."""
    return {v: cls.name for cls in classes().values() for v in cls.variants}


def option_owners() -> dict[str, type[Method]]:
    """Every declared option name -> the method class that declares it."""
    return {f.name: cls for cls in _CLASSES.values() for f in option_fields(cls)}


# ----------------------------------------------------------------------------- configs
def resolve(config: TrainConfig) -> TrainConfig:
    """The config with its method resolved: canonical name, the variant's switches, every option
    of the method with its default filled and checked by the method's `Options`; options of other
    methods dropped; any other name refused, with the valid ones."""
    name = canonical_name(config.method, config.method_module)
    cls = method_class(name)
    own = {f.name for f in option_fields(cls)}
    foreign = set(option_owners()) - own
    unknown = sorted(set(config.method_options) - own - foreign)
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {unknown} for method {name}; its options are "
                          f"{sorted(own) or 'none'}, and TrainConfig's fields are {sorted(_CONFIG_FIELDS)}")
    given = {k: v for k, v in config.method_options.items() if k in own}
    switches = cls.variants.get(name, {})
    options = dataclasses.asdict(cls.Options(**{**given, **switches})) if cls.Options is not None else {}
    return dataclasses.replace(config, method=name, method_options=options)


def config_from_parameters(parameters: Mapping[str, Any]) -> TrainConfig:
    """The resolved TrainConfig of a notebook's (or a study step's) parameters: every name that is
    a TrainConfig field or a registered method option, plus the `extra` dict (options or fields),
    which wins. Names of anything else (the notebook's own variables) are ignored."""
    module = parameters.get("method_module") or (parameters.get("extra") or {}).get("method_module")
    if module:
        load(module)
    classes()
    known = _CONFIG_FIELDS | set(option_owners())
    values = {k: v for k, v in parameters.items() if k in known}
    return resolve(TrainConfig.from_dict({**values, **(parameters.get("extra") or {})}))


def option_specs() -> dict[str, dict[str, Any]]:
    """Every registered option as a papermill-style parameter spec (default, type, help), so that
    `cclnb study -p NAME=VALUE` checks and types a method option like a notebook parameter."""
    specs: dict[str, dict[str, Any]] = {}
    for cls in classes().values():
        hints = option_types(cls)
        for f in option_fields(cls):
            specs[f.name] = {"default": repr(option_default(f)), "inferred_type_name": _type_name(hints[f.name]),
                             "help": f"{cls.name}: {f.metadata.get('help', '')}".strip()}
    return specs


def option_default(f: dataclasses.Field) -> Any:
    """An option's default value (from its default or its default factory)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def value_type(annotation: Any) -> Any:
    """The type an option's value has when given: int for `int` and for `int | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(annotation) else annotation


def _type_name(annotation: Any) -> str:
    """"int", "Optional[int]", ... as papermill names a parameter's annotation."""
    inner = value_type(annotation)
    name = getattr(inner, "__name__", str(inner))
    return f"Optional[{name}]" if inner is not annotation else name
