"""Triton entry point: ``model.py`` here is copied to ``<backends>/weightbundle/model.py``."""
