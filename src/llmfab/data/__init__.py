"""Datasets: schemas, readers/writers, the stdlib corpus and the verifiable tasks."""
