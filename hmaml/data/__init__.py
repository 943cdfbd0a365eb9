"""Datasets: raw sources -> WebDataset shards -> episodic N-way K-shot tasks."""
