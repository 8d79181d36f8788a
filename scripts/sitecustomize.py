"""ckapipe imported from a repository checkout without installing it: scripts/gpu_check.sh puts this
file on a GPU node's PYTHONPATH (every Python process started there runs it first, Dask workers too).

The folders extract/, analyze/ and pipelines/ are the packages ckapipe.extract, ckapipe.analyze and
ckapipe.pipelines (pyproject.toml's package-dir), as an editable install maps them. ``import ckapipe``
imports its whole API, stages included, so the mapping must be in place before that import: a finder
on ``sys.meta_path`` for the four package names, under the checkout named by ``CKAPIPE_REPO``.
"""

import importlib.util
import os
import sys

FOLDERS = {"ckapipe": "ckapipe", "ckapipe.extract": "extract", "ckapipe.analyze": "analyze",
           "ckapipe.pipelines": "pipelines"}


class CheckoutFinder:
    """The packages of FOLDERS from the checkout at ``$CKAPIPE_REPO``; any other name is left to the next finder."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        root = os.environ.get("CKAPIPE_REPO")
        if not root or name not in FOLDERS:
            return None
        folder = os.path.join(root, FOLDERS[name])
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


sys.meta_path.insert(0, CheckoutFinder)
