"""Curvature-block structures and their registry (see ``base.py`` for the interface).

Importing this package registers every built-in structure.
"""
from tensorcurv.structures import dense, diagonal, ekfac, kfac, kron_sum  # noqa: F401  (registration)
from tensorcurv.structures.base import Structure, create, get, make_hparams, names, register
from tensorcurv.structures.split import tt, tucker  # noqa: F401  (registration)

# isort: split
from tensorcurv.structures import two_level  # noqa: F401  (model-scope: registered after the layer-scope ones)

__all__ = ["Structure", "create", "get", "make_hparams", "names", "register"]
