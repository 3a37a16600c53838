"""Prefect orchestration only: every task calls a library function that also works without Prefect."""
