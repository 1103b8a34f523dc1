"""Side-by-side timing of kdjax against a PyTorch reference of the seed's training loop."""
