"""Prefect tasks: thin wrappers that add caching, retries and UI artifacts to plain functions."""
