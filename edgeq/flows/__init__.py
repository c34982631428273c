"""Prefect flows; each takes one pydantic parameter model, which the Prefect UI renders as a form."""
