"""Digits: a typed Brain trains an MLP on scikit-learn's handwritten digits."""
