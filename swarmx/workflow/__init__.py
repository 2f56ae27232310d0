"""Workflow files and the pure workflow engine."""
