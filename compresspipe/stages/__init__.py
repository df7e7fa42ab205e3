"""Built-in stages; importing this package registers them."""

from . import train  # noqa: F401
