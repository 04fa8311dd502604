"""One module per CLI verb besides train and tune."""
