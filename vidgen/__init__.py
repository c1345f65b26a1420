"""vidgen: command line, tools, parallelism helper and demo of the video-generation suite.

The repository keeps ``callbacks/``, ``datamodules/`` and ``lightning_modules/`` at its top level; they are installed
as ``vidgen.callbacks``, ``vidgen.datamodules`` and ``vidgen.lightning_modules`` (``package-dir`` in
pyproject.toml), so nothing named ``callbacks`` lands in a user's environment. In a source checkout (tests, a
``git worktree``, ``python -m vidgen`` from the repository) the same names resolve to the top-level folders of the
checkout this package was imported from, below.
"""

import os as _os

__version__ = "0.1.0"

_SUBPACKAGES = ("callbacks", "datamodules", "lightning_modules")
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and all(
        _os.path.isfile(_os.path.join(_checkout, name, "__init__.py")) for name in _SUBPACKAGES):
    # vidgen.<name> -> <checkout>/<name>; only these three names (a restricted path entry, not the whole checkout)
    import importlib.util as _util
    import sys as _sys

    class _CheckoutFinder:
        """Maps vidgen.callbacks / vidgen.datamodules / vidgen.lightning_modules to the checkout's top-level folders."""

        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            head, _, name = fullname.partition(".")
            if head != __name__ or name not in _SUBPACKAGES:
                return None
            folder = _os.path.join(_checkout, name)
            return _util.spec_from_file_location(fullname, _os.path.join(folder, "__init__.py"),
                                                 submodule_search_locations=[folder])

    _sys.meta_path.insert(0, _CheckoutFinder)
