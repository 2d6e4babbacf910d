"""Datasets: the packed token shards that ingest writes and the trainer reads."""
