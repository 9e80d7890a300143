"""Data: readers, column mapping, label sets, splits, leak audit and built-in data sets."""
