"""The score job: offline classification on Ray Data (python -m score)."""
