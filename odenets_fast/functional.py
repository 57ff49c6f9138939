"""Functional interface: `odenets_fast.functional.ode_mlp` is `odenets_fast.ode_mlp`."""

from .ops import ode_mlp

__all__ = ["ode_mlp"]
