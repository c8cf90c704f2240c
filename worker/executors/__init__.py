"""Executors: one module per job type (inference with torch, transcode with PyAV)."""
