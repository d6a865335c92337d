"""Classification: images (and, later, time series) with any seqapps backbone."""
