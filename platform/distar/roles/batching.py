"""Concurrent requests to one role run as one call: what a pool replica does with the requests of
every trainer rank (and of concurrent Tune trials) that arrive together. Plain functions of the
roles' request and result types; Serve's batching only collects the requests."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

Request = TypeVar("Request")  # RewardRequest or ReferenceRequest: len() and a merge classmethod
Result = TypeVar("Result")  # their results: a split(sizes) method


def run_merged(call: Callable[[Request], Result], requests: list[Request], group: Callable[[Request], Hashable] = lambda r: None) -> list[Result]:
    """One `call` per group of requests (same `group(request)`, e.g. the same objective), on the
    group merged in request order; each request gets its own rows of the result back, in order."""
    results: list[Result | None] = [None] * len(requests)
    for key in dict.fromkeys(group(r) for r in requests):  # groups in order of first arrival
        members = [i for i, r in enumerate(requests) if group(r) == key]
        batch = [requests[i] for i in members]
        for i, part in zip(members, call(type(batch[0]).merge(batch)).split([len(r) for r in batch])):
            results[i] = part
    return results
