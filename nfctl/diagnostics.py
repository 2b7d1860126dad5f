"""A problem found in user input, located as precisely as the source allows."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Diagnostic:
    file: str
    message: str
    line: int | None = None
    column: int | None = None
    field: str | None = None
    severity: str = "error"
    detail: str | None = None  # e.g. the verifier log; long, shown on request

    def location(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where

    def __str__(self) -> str:
        field = f" [{self.field}]" if self.field else ""
        return f"{self.location()}{field}: {self.severity}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnostic:
        return cls(**data)


class DiagnosticError(Exception):
    """Raised where a single located problem stops an operation."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("; ".join(str(d) for d in diagnostics))
