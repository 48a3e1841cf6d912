"""Real-time upscaling daemon, its client library and tools.

Importing the package (or :mod:`upscaler_server.client`) loads no torch: the client side is numpy, pyzmq and msgpack
only. The daemon (``python -m upscaler_server``) loads the engine, which imports torch and ``models``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
