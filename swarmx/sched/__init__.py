"""Scheduling policies: pure code (no I/O, no clock), shared by the scheduler daemon and the
simulator."""
