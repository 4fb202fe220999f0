"""Records, corpora, partitioners and tokenization: everything between raw text and client batches."""
