"""Finding the app a ``hedwig-tasks`` command runs, and saying how to fix it when it cannot be found.

``-A`` names a module and, after a colon, an attribute path in it: a :class:`Hedwig` app, a
Flask app that holds the :class:`~hedwig_tasks.flask.HedwigTasks` extension, or the extension
itself (``-A flapp``, ``-A flapp:app``, ``-A flapp:ext.app``). Without ``-A`` the app is built
from Hedwig-style settings (``--settings``, ``$SETTINGS_MODULE`` or Django's settings).
Every failure is a :class:`CLIError`: one line that says what was tried and what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit

from hedwig_tasks.app import Hedwig
from hedwig_tasks.exceptions import ConfigurationError, HedwigError
from hedwig_tasks.flask import HedwigTasks

__all__ = ["CLIError", "EXIT_CONFIG", "EXIT_UNAVAILABLE", "find_app", "load_app", "masked_url"]

EXIT_CONFIG = 1  #: the app, a setting or the schema is wrong
EXIT_UNAVAILABLE = 3  #: something the command needs at start-up is unavailable

#: Query options whose values a banner or log line must not show.
SECRET_OPTIONS = ("password", "secret", "token", "key", "credential", "sas")


class CLIError(Exception):
    """A command cannot go on: ``str(error)`` is the one line to print, ``code`` the exit code."""

    def __init__(self, message: str, code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.code = code


def _cwd_on_path() -> str:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return cwd


def _nearby_modules(name: str) -> str:
    """`` (did you mean -A x?)`` for a module in the working directory named like ``name``."""
    cwd = Path.cwd()
    candidates = [p.stem for p in cwd.glob("*.py")] + [p.name for p in cwd.iterdir() if (p / "__init__.py").exists()]
    close = difflib.get_close_matches(name.rpartition(".")[2], candidates, n=1, cutoff=0.6)
    return f" (did you mean -A {close[0]}?)" if close else ""


def _module_from_file_spec(option: str, spec: str) -> NoReturn:
    """A module name for ``-A emails.py`` or ``-A app/emails.py``; CLIError saying which to use."""
    path = Path(spec.partition(":")[0])
    dotted = ".".join(path.with_suffix("").parts)
    rest = spec.partition(":")[1] + spec.partition(":")[2]
    raise CLIError(f"{option} {spec}: {option} takes a module, not a file: use {option} {dotted}{rest}")


def import_module(option: str, name: str, *, what: str) -> ModuleType:
    """Import ``name`` for ``option``; CLIError when it is missing (an error inside it propagates)."""
    if name.endswith(".py") or os.sep in name:
        _module_from_file_spec(option, name)
    cwd = _cwd_on_path()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise CLIError(
                f"{option} {name}: no module named {exc.name!r} in {cwd} or on the Python path"
                f"{_nearby_modules(name)}; {what}, run from the directory that holds it or add that "
                "directory to PYTHONPATH"
            ) from None
        raise _failed_import(option, name, exc) from None
    except HedwigError as exc:
        raise CLIError(f"{option} {name}: {exc}") from None
    except Exception as exc:
        raise _failed_import(option, name, exc) from None


def _failed_import(option: str, name: str, exc: Exception) -> CLIError:
    """The user's module raised: its traceback is printed now (it is theirs to read), then one line."""
    traceback.print_exception(exc, file=sys.stderr)
    return CLIError(f"{option} {name}: importing {name} raised {type(exc).__name__}: {exc} (traceback above)")


def _foreign(module: ModuleType) -> str:
    """Where ``module`` came from when that is not the working directory ('' when it is)."""
    file = getattr(module, "__file__", None)
    if file is None:
        return "Python's built-in modules"
    path = Path(file).resolve()
    if Path.cwd() in path.parents:
        return ""
    if "site-packages" in path.parts or "dist-packages" in path.parts:
        return f"an installed package ({path})"
    if Path(sysconfig.get_paths()["stdlib"]).resolve() in path.parents:
        return f"the standard library ({path})"
    return str(path)


def _no_app_here(option: str, spec: str, module: ModuleType, found: str) -> CLIError:
    elsewhere = _foreign(module)
    name = module.__name__
    if not elsewhere:
        return CLIError(
            f"{option} {spec}: expected one Hedwig app in {name}, found {found}; name it as {option} {name}:ATTRIBUTE"
        )
    top = name.partition(".")[0]
    if (Path.cwd() / f"{top}.py").exists() or (Path.cwd() / top / "__init__.py").exists():
        hint = f"your own {top} is hidden by it: rename your module"
    else:
        close = _nearby_modules(name)
        hint = close.strip(" ()") if close else "give the name of your module, from its directory"
    return CLIError(f"{option} {spec}: that imported {name} from {elsewhere}, which holds no Hedwig app; {hint}")


def _as_app(value: Any) -> Hedwig | None:
    """The Hedwig app ``value`` is or holds: the app, the Flask extension, or a Flask app with it."""
    if isinstance(value, Hedwig):
        return value
    if isinstance(value, HedwigTasks):
        return value.app
    # static: a module global such as flask.request is a proxy whose attributes raise outside a request
    extensions = inspect.getattr_static(value, "extensions", None)
    if isinstance(extensions, dict):
        return _as_app(extensions.get("hedwig_tasks"))
    return None


def _attribute(option: str, spec: str, module: ModuleType, path: str) -> Any:
    value: Any = module
    for part in path.split("."):
        if not hasattr(value, part):
            where = module.__name__ if value is module else repr(value)
            raise CLIError(f"{option} {spec}: {where} has no attribute {part!r}")
        value = getattr(value, part)
    return value


def load_app(spec: str, option: str = "-A") -> Hedwig:
    """The app named by ``module[:attribute.path]``: the module's only app when no attribute is named.

    Raises :class:`CLIError` saying what was tried and how to name the app instead.
    """
    module_name, _, path = spec.partition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        _module_from_file_spec(option, spec)
    module = import_module(option, module_name, what="give the module that holds your Hedwig app")
    if path:
        value = _attribute(option, spec, module, path)
        app = _as_app(value)
        if app is None:
            raise CLIError(
                f"{option} {spec}: {path} is a {type(value).__name__}, not a Hedwig app "
                "(nor a Flask app with the HedwigTasks extension)"
            )
        return _remember(app, value)
    apps: dict[int, tuple[str, Hedwig, Any]] = {}
    for name, value in vars(module).items():
        app = _as_app(value)
        if app is not None and not name.startswith("_"):
            apps.setdefault(id(app), (name, app, value))
    if len(apps) != 1:
        raise _no_app_here(option, spec, module, ", ".join(sorted(n for n, _, _ in apps.values())) or "none")
    ((_, app, value),) = apps.values()
    return _remember(app, value)


def _remember(app: Hedwig, value: Any) -> Hedwig:
    """The app ``-A`` found is the default app in every thread, unless settings built one already:
    ``Message.new(...).publish()`` in a handler uses it (a Flask app context is per thread)."""
    from hedwig_tasks import conf

    with contextlib.suppress(ConfigurationError):
        conf.use_app(app)
    return app


def app_from_settings(settings_module: str | None) -> Hedwig:
    """The app Hedwig-style settings describe: ``--settings``, ``$SETTINGS_MODULE`` or Django's."""
    if settings_module:
        import_module("--settings", settings_module, what="give the dotted module path of your settings")
        os.environ["SETTINGS_MODULE"] = settings_module
    elif os.environ.get("SETTINGS_MODULE"):
        import_module("$SETTINGS_MODULE", os.environ["SETTINGS_MODULE"], what="give the dotted module path")
    elif os.environ.get("DJANGO_SETTINGS_MODULE"):
        import_module("$DJANGO_SETTINGS_MODULE", os.environ["DJANGO_SETTINGS_MODULE"], what="fix the variable")
        import django

        try:
            django.setup()  # runs the app config, which builds the app and discovers handlers
        except HedwigError as exc:
            raise CLIError(f"Django settings: {exc}") from None
    else:
        raise CLIError(
            "no app: -A MODULE[:ATTRIBUTE] names the module holding your Hedwig app (as in -A tasks), "
            "or --settings MODULE builds one from Hedwig settings; neither was given and settings are not "
            "configured ($SETTINGS_MODULE and $DJANGO_SETTINGS_MODULE are unset)"
        )
    from hedwig_tasks.conf import default_app

    try:
        return default_app()
    except ConfigurationError as exc:
        raise CLIError(f"settings: {exc}") from None


def find_app(app_spec: str | None, settings_module: str | None) -> Hedwig:
    """The app ``-A`` names, else the one the settings describe."""
    return load_app(app_spec) if app_spec else app_from_settings(settings_module)


def masked_url(url: str) -> str:
    """``url`` with its password and secret-looking query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return f"{url.partition(':')[0]}://***"
    secret = [any(s in key.lower() for s in SECRET_OPTIONS) for key, _ in pairs]
    if password is None and not any(secret):
        return url
    head, mark, _ = url.partition("?")
    if password is not None:
        head = head.replace(f":{password}@", ":***@", 1)
    query = [(key, "***" if hidden else value) for (key, value), hidden in zip(pairs, secret, strict=True)]
    return head + mark + urlencode(query, safe="/:,*") if query else head
