"""Datasets: streamed document sources, tokenisation, packing into blocks, tokenizers."""
