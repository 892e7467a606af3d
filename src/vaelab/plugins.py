"""Your own code, imported from a file only when asked: ``vaelab train --plugin my_nets.py``.

A plugin is a Python file that registers things with vaelab's registries when imported: an
encoder/decoder pair (``vaelab.nets.register``), a model (``vaelab.models.register``), a metric
(``vaelab.metrics.metric``). vaelab never imports one on its own, not even the plugin a run
records (``RUN/config.json``): loading a run reads only JSON and safetensors, and the command
line imports a file only when ``--plugin`` names it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType


class PluginError(ValueError):
    """A plugin file that cannot be imported (message names the file)."""


def load_plugin(path: str | Path) -> ModuleType:
    """Import the Python file ``path`` as a module, so that what it registers is there. The same
    file imported again is imported again (its registrations stay the same). A PluginError, one
    line naming the file, for a file that is missing, not Python, or fails while imported."""
    path = Path(path)
    if path.is_dir():
        raise PluginError(f"plugin '{path}' is a folder: expected a Python file (.py)")
    if not path.is_file():
        raise PluginError(f"plugin '{path}' not found")
    file = path.resolve()
    spec = importlib.util.spec_from_file_location(_module_name(file), file)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin '{path}': expected a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # what its dataclasses and pickling look up
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the plugin's own code may raise anything: one line, its file
        del sys.modules[spec.name]
        raise PluginError(f"plugin '{path}': cannot import it ({_where(err, file)})") from None
    return module


def _module_name(file: Path) -> str:
    """A module name of its own for each file: two files of the same name in other folders
    stay two modules."""
    stem = re.sub(r"\W", "_", file.stem)
    return f"_vaelab_plugin_{stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"


def _where(err: Exception, file: Path) -> str:
    """The error in one line, with the plugin's line it came from."""
    if isinstance(err, SyntaxError) and err.lineno is not None:
        return f"line {err.lineno}: {type(err).__name__}: {err.msg}"
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == str(file)]
    text = (str(err).strip().splitlines() or [""])[0]
    what = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return f"line {lines[-1]}: {what}" if lines else what
