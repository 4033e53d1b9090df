"""One process of an open-loop HTTP load generator: ``python -m tests.load_generator``.

``python -m tests.load_generator RATE DURATION TIMEOUT`` prints ``{"ready":
true}`` once it is set up, then runs one load per line on its stdin, a JSON
object ``{"url": ..., "seed": ...}``: GET requests to the URL at RATE per
second (Poisson arrivals, seeded) for DURATION seconds, each on its own
schedule whatever became of the earlier ones (open loop: a slow server is
not spared new requests, as a public API is not). After each load it prints
``{"results": [[status, seconds], ...]}``: each request's status (0: no
answer within TIMEOUT seconds, or a connection error) and its latency as
this process measured it. It ends with its stdin.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import httpx


async def load(
    client: httpx.AsyncClient, url: str, rate: float, duration: float, seed: int
) -> list[tuple[int, float]]:
    arrivals = random.Random(seed)
    results: list[tuple[int, float]] = []

    async def one() -> None:
        start = time.perf_counter()
        try:
            response = await client.get(url)
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        results.append((status, time.perf_counter() - start))

    tasks = []
    start = time.perf_counter()
    due = start + arrivals.expovariate(rate)
    while due < start + duration:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one()))
        due += arrivals.expovariate(rate)
    await asyncio.gather(*tasks)
    return results


async def main(rate: float, duration: float, timeout: float) -> None:
    print(json.dumps({"ready": True}), flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        command = json.loads(line)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            results = await load(client, command["url"], rate, duration, command["seed"])
        print(json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    rate, duration, timeout = sys.argv[1:4]
    asyncio.run(main(float(rate), float(duration), float(timeout)))
