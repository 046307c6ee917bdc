"""Data that ships inside pip packages: the bundled image domains (``domains.py``) that mtil-mini, the
small CLIP's pretraining and cvit-mini are built from."""
