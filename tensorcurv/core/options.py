"""String options: :class:`Option`, the base of every option enum (damping kind, curvature kind, ...).

An option is a ``(str, Enum)``: each member *is* its string value (``DampingKind.PI == "pi"``), so
configs and user code keep passing plain strings, and ``str``, ``repr`` and f-strings give the value. Each enum
lives next to the concept it names; :meth:`Option.parse` turns a user's string into the member or
raises a ``ValueError`` that names the key and lists the valid values. Dataclass fields holding an
option are annotated ``str`` with a member as default (``damping_kind: str = DampingKind.TIKHONOV``) and
parsed in ``__post_init__``, so OmegaConf structured configs take the plain strings too.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

O = TypeVar("O", bound="Option")  # noqa: E741


class Option(str, Enum):
    """A string enum whose members compare equal to, and print as, their values."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:  # dataclass reprs and ``{x!r}`` in messages read as with a plain string
        return repr(self.value)

    @classmethod
    def values(cls) -> list[str]:
        """The valid strings, in declaration order."""
        return [m.value for m in cls]

    @classmethod
    def parse(cls: type[O], value: Any, key: str) -> O:
        """The member whose value is ``value``; ``ValueError`` ``"key='x' is not one of [...]"`` otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not one of {cls.values()}") from None


def plain_options(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every :class:`Option` member replaced by its plain string (for checkpoints that
    ``torch.load(weights_only=True)`` reads back, and for YAML)."""
    return {k: v.value if isinstance(v, Option) else v for k, v in values.items()}
