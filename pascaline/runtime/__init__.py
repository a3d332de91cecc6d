"""Device capabilities, sampling, sizing and the pipeline orchestrator."""
