"""`python -m odenets_fast B q m L [options]`: the Triton backend's plan for a stack (odenets_fast.plan)."""

from .planner import main

main()
