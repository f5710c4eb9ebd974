from typing import Any, Callable, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

HookType: type

def hook(function: _F) -> _F: ...

def storage_methods(cls: type, /) -> tuple[Any, Any]: ...
def storage_type(bases: tuple[type, ...], get_store_doc: str, getStore_doc: str, /) -> type: ...
