"""Producing: rate control that drives a source into the stream; dead letters."""
