"""Vocabulary-parallel KD (the documented home of ``distillkit.parallel``; the code lives in
``distillkit.losses.parallel``)."""
from .losses.parallel import *  # noqa: F401,F403
from .losses.parallel import __all__  # noqa: F401
