"""SwarmX: a tail-aware scheduler for agentic AI clusters."""

__version__ = "0.1.0"
