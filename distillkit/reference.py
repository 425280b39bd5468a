"""Pure-PyTorch references of every op (the documented home of ``distillkit.reference``; the
code lives beside the op wrappers, in ``distillkit.ops.reference``)."""
from .ops.reference import *  # noqa: F401,F403
from .ops.reference import __all__  # noqa: F401
