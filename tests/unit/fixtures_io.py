"""Read the recorded node exchanges in ``tests/fixtures/execution-apis``.

Each ``.io`` file holds ``>> {request}`` / ``<< {response}`` line pairs from a
real geth node (the ethereum/execution-apis conformance tests, CC0; see the
README and LICENSE there). Lines starting with ``//`` are comments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXECUTION_APIS = Path(__file__).resolve().parents[1] / "fixtures" / "execution-apis"


@dataclass(frozen=True)
class Exchange:
    """One request and the node's response."""

    request: dict[str, Any]
    response: dict[str, Any]

    @property
    def result(self) -> Any:
        if "error" in self.response:
            raise AssertionError(f"fixture holds an error: {self.response['error']}")
        return self.response["result"]


def load_io(name: str) -> list[Exchange]:
    """The exchanges of ``<method>/<fixture>.io`` (``.io`` optional), in file order."""
    path = EXECUTION_APIS / (name if name.endswith(".io") else name + ".io")
    exchanges: list[Exchange] = []
    request: dict[str, Any] | None = None
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(">>"):
            request = json.loads(line[2:])
        elif line.startswith("<<"):
            if request is None:
                raise ValueError(f"{path}:{lineno}: response without a request")
            exchanges.append(Exchange(request, json.loads(line[2:])))
            request = None
        elif line.strip() and not line.startswith("//"):
            raise ValueError(f"{path}:{lineno}: unexpected line {line[:40]!r}")
    return exchanges


def result(name: str) -> Any:
    """The ``result`` of a fixture holding exactly one exchange."""
    (exchange,) = load_io(name)
    return exchange.result
