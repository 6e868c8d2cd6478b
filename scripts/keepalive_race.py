"""The keep-alive race behind the load run's httpx ReadErrors, amplified (a script, not a test).

    python scripts/keepalive_race.py --seconds 60                          # the server's default
    python scripts/keepalive_race.py --seconds 60 --keep-alive-timeout-s 5  # uvicorn's default

An HTTP/1.1 client pools idle connections for its keepalive_expiry (httpx: 5 s); a server
closes them after its keep-alive timeout (uvicorn's default is also 5 s). When the client
reuses a connection just as the server's timer closes it, the request meets the close: the
server's kernel answers the unread request with a reset and the client gets httpx.ReadError.
Here --idle-clients each reuse their one pooled connection after an idle time drawn just below
--client-expiry-s, while --busy-clients keep the server's event loop (and the client's) loaded,
as 64 clients did in scripts/load_hot_swap.py. It prints the idle clients' outcomes by kind
(and any errors of the busy ones).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from load_hot_swap import free_port, prepare, start


async def run(url: str, images: list[bytes], args: argparse.Namespace) -> tuple[Counter, Counter]:
    outcomes: Counter = Counter()
    busy_errors: Counter = Counter()
    stop_at = time.monotonic() + args.seconds

    async def classify(client: httpx.AsyncClient, k: int) -> httpx.Response:
        return await client.post("/v1/classify", params={"cache": "fashion"},
                                 files=[("file", (f"{k}.png", images[k % len(images)], "image/png"))])

    async def busy(client: httpx.AsyncClient, k: int) -> None:
        while time.monotonic() < stop_at:
            try:
                await classify(client, k)
            except httpx.HTTPError as exc:
                busy_errors[type(exc).__name__] += 1

    async def idle(k: int) -> None:
        limits = httpx.Limits(keepalive_expiry=args.client_expiry_s)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            while time.monotonic() < stop_at:
                try:
                    outcomes[(await classify(client, k)).status_code] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                # Just below the client's expiry: it reuses the connection, as a pool does.
                await asyncio.sleep(random.uniform(args.client_expiry_s - 0.1, args.client_expiry_s))

    async with httpx.AsyncClient(base_url=url, timeout=120) as shared:
        await asyncio.gather(*(busy(shared, k) for k in range(args.busy_clients)),
                             *(idle(k) for k in range(args.idle_clients)))
    return outcomes, busy_errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--busy-clients", type=int, default=16)
    ap.add_argument("--idle-clients", type=int, default=32)
    ap.add_argument("--client-expiry-s", type=float, default=httpx.Limits().keepalive_expiry)
    ap.add_argument("--keep-alive-timeout-s", type=float, default=None,
                    help="passed to kvclip serve (default: the server's own)")
    args = ap.parse_args()
    flags = [] if args.keep_alive_timeout_s is None else ["--keep-alive-timeout-s", str(args.keep_alive_timeout_s)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = prepare(tmp)
        port = free_port()
        server = start(tmp, port, *flags)
        try:
            outcomes, busy_errors = asyncio.run(run(f"http://127.0.0.1:{port}", images, args))
        finally:
            server.terminate()
            server.wait(60)
    server_side = args.keep_alive_timeout_s if flags else "default"
    print(f"keep-alive: server {server_side}, client expiry {args.client_expiry_s:g} s; "
          f"{args.idle_clients} idle-reuse clients, {args.busy_clients} busy clients, {args.seconds:.0f} s")
    print(f"  idle-reuse requests by outcome: {dict(outcomes)}; busy clients' errors: {dict(busy_errors)}")


if __name__ == "__main__":
    main()
