from typing import Any, Callable, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

HookType: type

def hook(function: _F) -> _F: ...
