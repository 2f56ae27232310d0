"""Collectors turning psutil/NVML readings into typed samples; blocking, so run in an executor."""
