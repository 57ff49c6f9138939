"""odenets_fast: deep residual MLP stacks trained as neural ODEs, with memory that does not grow with depth.

See DESIGN.md for the formulas every backend implements.
"""

from . import diagnostics, functional
from .backends import BackendUnavailableError, available_backends
from .convert import convert
from .nn import ODEMLP
from .ops import ode_mlp
from .planner import plan
from .stack import AdjointResidualStack

__version__ = "0.1.0"

__all__ = [
    "AdjointResidualStack",
    "ODEMLP",
    "BackendUnavailableError",
    "available_backends",
    "convert",
    "diagnostics",
    "functional",
    "ode_mlp",
    "plan",
]
