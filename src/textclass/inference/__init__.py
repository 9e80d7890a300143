"""Prediction from run directories (torch backend)."""
