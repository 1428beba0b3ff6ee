"""The reference implementations (torchreid 0.2.5, pip-installed for tests and benchmarks only).

Its modules are loaded by file path: importing the ``torchreid`` package runs a heavy ``__init__`` that
needs opencv, gdown and tensorboard, while ``rank.py`` and ``rerank.py`` need only numpy.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from types import ModuleType


def torchreid_root() -> Path | None:
    """Install folder of the torchreid package, or None when it is not installed (nothing is imported)."""
    spec = importlib.util.find_spec("torchreid")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load_torchreid_file(relpath: str) -> ModuleType:
    """Load ``torchreid/<relpath>`` as a standalone module; ImportError when torchreid is not installed."""
    root = torchreid_root()
    if root is None or not (root / relpath).is_file():
        raise ImportError(f"torchreid is not installed (pip install --no-deps torchreid==0.2.5); needed {relpath}")
    spec = importlib.util.spec_from_file_location(f"_oracle_{Path(relpath).stem}", root / relpath)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation is unavailable"
        spec.loader.exec_module(module)
    return module


def oracle_rank() -> ModuleType:
    """torchreid's ``reid/metrics/rank.py`` (``evaluate_rank``, ``eval_market1501``)."""
    return load_torchreid_file("reid/metrics/rank.py")


def oracle_rerank() -> ModuleType:
    """torchreid's ``reid/utils/rerank.py`` (``re_ranking``)."""
    return load_torchreid_file("reid/utils/rerank.py")
