"""KD-Zero (the documented home of ``distillkit.kdzero``; the code lives in
``distillkit.methods.kdzero``)."""
from .methods.kdzero import *  # noqa: F401,F403
from .methods.kdzero import __all__  # noqa: F401
