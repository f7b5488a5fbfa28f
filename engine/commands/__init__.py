"""The built-in commands of ``convlens`` (``cli.py``); methods bring their own in ``engine/<method>/cli.py``."""
