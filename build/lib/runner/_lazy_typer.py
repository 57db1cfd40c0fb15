"""`typer`, imported on first real use, so that `import runner.cli` costs almost nothing.

`airlock run` with a server answering never needs typer (the thin client in
`runner.cli.main` is standard library only); typer's import alone would add tens of
milliseconds to every start. `runner/cli.py` binds the name `typer` to `LAZY`:

- `typer.Typer(...)` returns an app that records `command`, `callback` and
  `add_typer` calls and builds the real `typer.Typer` when it is first called or
  asked for anything else;
- every other attribute (`typer.Option`, `typer.echo`, `typer.Exit`, ...) is the real
  one, imported then. Option annotations are strings (`from __future__ import
  annotations`), so they are evaluated only when typer itself inspects the commands.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


class PendingTyper:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs
        self._ops: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = []
        self._real: Any = None

    def _decorator(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if self._real is not None:
            decorate: Callable[[Callable[..., Any]], Callable[..., Any]] = getattr(
                self._real, op)(*args, **kwargs)
            return decorate

        def record(func: Callable[..., Any]) -> Callable[..., Any]:
            self._ops.append((op, args, kwargs, func))
            return func

        return record

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("command", args, kwargs)

    def callback(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("callback", args, kwargs)

    def add_typer(self, sub: Any, *args: Any, **kwargs: Any) -> None:
        if self._real is not None:
            self._real.add_typer(real(sub), *args, **kwargs)
        else:
            self._ops.append(("add_typer", (sub, *args), kwargs, None))

    def real(self) -> Any:
        if self._real is None:
            import typer

            app = typer.Typer(*self._args, **self._kwargs)
            for op, args, kwargs, func in self._ops:
                if op == "add_typer":
                    app.add_typer(real(args[0]), *args[1:], **kwargs)
                else:
                    getattr(app, op)(*args, **kwargs)(func)
            self._real = app
            self._ops.clear()
        return self._real

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.real()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.real(), name)


def real(app: Any) -> Any:
    """The real `typer.Typer` behind `app` (which may already be one)."""
    return app.real() if isinstance(app, PendingTyper) else app


class _LazyModule(types.ModuleType):
    Typer = PendingTyper

    def __getattr__(self, name: str) -> Any:
        import typer

        return getattr(typer, name)


LAZY = _LazyModule("typer")
