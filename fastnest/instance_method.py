"""A method set on ONE instance (fastnest patches instances, never classes) that copies and pickles with it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class InstanceMethod:
    """``impl(owner, *args, **kwargs)`` as ``owner``'s method, stored in its ``__dict__``.

    ``original`` (the class's method it stands in for) lends its signature without ``self``: Hugging Face's
    ``generate`` inspects ``forward``'s, and picks the image encoder's arguments by it. A ``types.MethodType``
    of a closure would do as much, but does not pickle (``torch.save(model)``, spawned workers); this one
    pickles as ``(impl, owner, original)``, so ``impl`` must be a module-level function (or a partial of one),
    and ``copy.deepcopy`` binds the copy's method to the copied owner.
    """

    def __init__(self, impl: Callable[..., Any], owner: object, original: Callable[..., Any] | None = None) -> None:
        self.impl, self.owner, self.original = impl, owner, original
        fn = original if original is not None else impl
        self.__name__ = getattr(fn, "__name__", None) or fn.func.__name__  # a partial names its function
        self.__doc__ = getattr(fn, "__doc__", None)
        params = list(inspect.signature(fn).parameters.values())
        self.__signature__ = inspect.Signature(params[1:])  # the owner is bound

    @property
    def __self__(self) -> object:  # a bound method's attributes, for code that unwraps one
        return self.owner

    @property
    def __func__(self) -> Callable[..., Any]:
        return self.impl

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.impl(self.owner, *args, **kwargs)

    def __reduce__(self):
        return InstanceMethod, (self.impl, self.owner, self.original)

    def __repr__(self) -> str:
        return f"<fastnest method {self.__name__} of {type(self.owner).__name__}>"
