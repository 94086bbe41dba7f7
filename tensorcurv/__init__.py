"""tensorcurv: low-rank tensor approximations of Fisher / Gauss-Newton curvature blocks.

Data flows one way: model + batch → ``capture`` → ``LayerStats`` → ``structures`` → ``solve`` →
optimizers / unlearning / studies.
"""

from tensorcurv import structures
from tensorcurv.core.stats import LayerStats
from tensorcurv.curvature import Curvature

__all__ = ["Curvature", "LayerStats", "structures"]
__version__ = "0.1.0"
