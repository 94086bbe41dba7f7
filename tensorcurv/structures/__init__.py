"""Curvature-block structures and their registry (see ``base.py`` for the layer interface,
``model.py`` for the model-level one and ``registry.py`` for the names).

Importing this package registers every built-in structure.
"""

from tensorcurv.structures import dense, diagonal, ekfac, kfac, kron_rank2, kron_sum  # noqa: F401  (registration)
from tensorcurv.structures.base import Structure
from tensorcurv.structures.model import BlockDiagonal, ModelStructure
from tensorcurv.structures.registry import create, get, layer_names, make_hparams, names, register, unregister
from tensorcurv.structures.split import tt, tucker  # noqa: F401  (registration)

# isort: split
from tensorcurv.structures import dense_full, exact_batch, two_level  # noqa: F401  (model level: registered after the layer structures)

__all__ = [
    "BlockDiagonal",
    "ModelStructure",
    "Structure",
    "create",
    "get",
    "layer_names",
    "make_hparams",
    "names",
    "register",
    "unregister",
]
