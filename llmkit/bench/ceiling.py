"""How fast this client itself can go, so a figure the client limited is never taken for the server's.

benchmarks/bench_ceiling.py drives bench's own load loop (runner.run_point, the same requests and
SSE parsing) against a server that answers at once: a raw asyncio HTTP server in a child process
that streams N one-token chunks with no delay. Its two figures are recorded here with the date and
the machine: the requests per second the client completes with one-token answers, and the output
chunks per second it reads from long streams. When a point of a real run gets above
NEAR_CEILING_SHARE of either, bench warns that the client may be what limits it. Re-run the script
on a different machine and update the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

NEAR_CEILING_SHARE = 0.5


@dataclass(frozen=True)
class ClientCeiling:
    requests_per_s: float  # one-token answers, concurrency CEILING_CONCURRENCY
    chunks_per_s: float  # output chunks (one token each) read from long streams
    measured: str  # date of the run
    machine: str

    def to_dict(self) -> dict[str, object]:
        return {
            "requests_per_s": self.requests_per_s,
            "chunks_per_s": self.chunks_per_s,
            "measured": self.measured,
            "machine": self.machine,
        }


# `python benchmarks/bench_ceiling.py`, 2026-12-01, on the machine below (docs/bench.md has the run).
CLIENT_CEILING = ClientCeiling(
    requests_per_s=374.0, chunks_per_s=17321.0, measured="2026-12-01", machine="2-core AMD EPYC, no GPU, Python 3.11"
)


def ceiling_share(request_throughput: float, chunk_throughput: float, ceiling: ClientCeiling | None = None) -> float:
    """The larger of the two shares of the client's ceiling a point used (0 when no ceiling is recorded)."""
    ceiling = ceiling or CLIENT_CEILING
    shares = [0.0]
    if ceiling.requests_per_s > 0:
        shares.append(request_throughput / ceiling.requests_per_s)
    if ceiling.chunks_per_s > 0:
        shares.append(chunk_throughput / ceiling.chunks_per_s)
    return max(shares)


def near_ceiling(request_throughput: float, chunk_throughput: float, ceiling: ClientCeiling | None = None) -> bool:
    return ceiling_share(request_throughput, chunk_throughput, ceiling) > NEAR_CEILING_SHARE
