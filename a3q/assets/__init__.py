"""Offline assets: the bundled real model (``models``) and the cache it is prepared into (``cache``)."""
