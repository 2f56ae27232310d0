"""Latency predictors (torch): the only package besides backends/ that imports torch.

Nothing here is imported by the node agent, so a CPU tool host never pays for torch.
"""
