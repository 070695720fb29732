"""Import advedge from a bare working tree, where it cannot be pip-installed.

``pyproject.toml`` maps ``export/`` and ``calibration/`` into the ``advedge`` namespace
(``advedge.export``, ``advedge.calibration``), which only an install sets up. A machine that
receives just the working tree and has no pip (the lent GPU machine) gets the same mapping here:
:func:`install` puts the repository on ``sys.path`` and registers both folders as the
subpackages they are installed as. :func:`site_dir` writes a folder with a ``sitecustomize.py``
that does it, for subprocesses (``PYTHONPATH=<that folder>``: ``python -m advedge``, pytest).

Where advedge is installed already, nothing changes.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"advedge.export": "export", "advedge.calibration": "calibration"}

__all__ = ["ROOT", "install", "site_dir"]


def install(root: Path = ROOT) -> bool:
    """Make ``advedge`` and its mapped subpackages importable from ``root``; True when the
    mapping had to be made here (no install), False when an install provides it."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        if importlib.util.find_spec("advedge.export") is not None:
            return False
    except ModuleNotFoundError:
        pass
    import advedge

    for name, folder in SUBPACKAGES.items():
        spec = importlib.util.spec_from_file_location(
            name, root / folder / "__init__.py", submodule_search_locations=[str(root / folder)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot map {name} to {root / folder}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        setattr(advedge, name.rsplit(".", 1)[1], module)
        spec.loader.exec_module(module)
    return True


def site_dir(root: Path = ROOT, folder: Path | None = None) -> Path:
    """A folder (``folder``, else a new temporary one) whose ``sitecustomize.py`` calls
    :func:`install` at start-up: put it on a subprocess's ``PYTHONPATH``."""
    folder = Path(tempfile.mkdtemp(prefix="advedge-site-")) if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import _bootstrap\n"
        f"_bootstrap.install(_bootstrap.Path({str(root)!r}))\n"
    )
    return folder
