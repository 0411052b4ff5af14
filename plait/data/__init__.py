"""Corpora, tokenizer and deterministic sampling."""

from plait.data.corpus import Corpus, load_corpus
from plait.data.sampler import ChunkSampler, micro_batches, rank_slice
from plait.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "ChunkSampler", "Corpus", "load_corpus", "micro_batches", "rank_slice"]
