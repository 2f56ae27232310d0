"""Daemons: the I/O shells around pure state (node agent, scheduler, local cluster supervisor)."""
