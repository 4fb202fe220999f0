"""Engines own the round loop: sampling, sending, failures, metrics. The algorithms never see them."""
