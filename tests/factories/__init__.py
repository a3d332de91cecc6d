"""Tiny random-weight models, built at test time and saved in every real file layout."""
