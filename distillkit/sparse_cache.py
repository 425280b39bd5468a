"""The top-K teacher cache (the documented home of ``distillkit.sparse_cache``; the code lives
in ``distillkit.data.sparse_cache``)."""
from .data.sparse_cache import *  # noqa: F401,F403
from .data.sparse_cache import __all__  # noqa: F401
