"""raylm: from a text corpus to a served language model on Ray."""

from raylm.cluster import prepare_environment

# Ray reads RAY_AUTH_MODE once, when it is first imported: set raylm's defaults before any module imports ray.
prepare_environment()

__version__ = "0.1.0"
