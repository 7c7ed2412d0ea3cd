"""What one image fetch costs the worker's CPU over a new connection and over a kept one (VQA_FETCH_KEEPALIVE_S), http and https.

    .venv/bin/python -m bench.fetchconn --out docs/benchmarks/queue-cost/fetch-keepalive    # ~1 min

``fetch_bytes`` exactly as a fetch thread calls it (the URL parsed and vetted, the total
deadline armed, the body read under the byte cap), one call after another on one thread,
timed with ``time.process_time()``: the process's CPU, the kernel's share of the socket calls
and, over https, the TLS handshake and certificate check included. Every https fetch uses the
one shared TLS context; the run also times building one with the system trust store, which
urllib3 did for every new connection before. The image host is a keep-alive HTTP/1.1 server
(as CDNs and S3 are) in a separate process, so its own CPU is not counted; the image is one of
the throughput bench's JPEGs. Prints the table and writes fetch-keepalive.json and
fetch-keepalive.md.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from urllib3.util.ssl_ import create_urllib3_context

from bench.model import write_workloads
from bench.preprocess import run_header, write_result
from bench.s3put import cpu_ms_per_call
from worker.fetch.images import FetchPolicy, fetch_bytes
from worker.fetch.kept import KeptConnections


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def _serve(directory: str, sock: socket.socket, cert: tuple[str, str] | None) -> None:
    server = http.server.ThreadingHTTPServer(sock.getsockname(), functools.partial(_Handler, directory=directory),
                                             bind_and_activate=False)
    server.socket = sock
    server.daemon_threads = True
    if cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert)
        server.socket = context.wrap_socket(sock, server_side=True)
    server.serve_forever()


def _system_store_with(cert: str, path: Path) -> Path | None:
    """The system's CA bundle with the bench's certificate appended (SSL_CERT_FILE then points at it); None without one."""
    system = ssl.get_default_verify_paths().cafile
    if not system or not Path(system).exists():
        return None
    path.write_bytes(Path(system).read_bytes() + b"\n" + Path(cert).read_bytes())
    return path


def _listening() -> socket.socket:
    # On the address "localhost" resolves to first (::1 on some machines): a fetch of localhost connects
    # there first, so a server on the other loopback would add a refused connect to every new connection.
    family, _, _, _, address = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family)
    sock.bind(address[:2])
    sock.listen(64)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fetchconn", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/queue-cost/fetch-keepalive"))
    parser.add_argument("--fetches", type=int, default=300, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from tests.support.abusive_http import write_self_signed_cert

    work = Path(tempfile.mkdtemp(prefix="vqa-fetchconn-"))
    name = write_workloads(work / "images", uniform=1, mixed=0)["uniform"].files[0]
    cert = write_self_signed_cert(work, ["localhost"])
    system_store = _system_store_with(cert[0], work / "system-plus-bench.pem")
    servers: list[multiprocessing.Process] = []
    figures: dict[str, Any] = {}
    try:
        for scheme in ("http", "https"):
            sock = _listening()
            server = multiprocessing.Process(target=_serve, args=(str(work / "images"), sock, cert if scheme == "https" else None),
                                             daemon=True)
            server.start()
            servers.append(server)
            url = f"{scheme}://localhost:{sock.getsockname()[1]}/{name}"
            allowed = (f"localhost:{sock.getsockname()[1]}",)
            for label, kept in (("new", None), ("kept", KeptConnections(idle_s=60))):
                policy = FetchPolicy(allowed_hosts=allowed, ca_bundle=cert[0], connections=kept)
                figures[f"{scheme}_{label}_cpu_ms"] = cpu_ms_per_call(lambda _i, p=policy: fetch_bytes(url, p), args.fetches, args.rounds)
                if kept is not None:
                    figures[f"{scheme}_kept_reused"] = kept.reused
            if scheme == "https" and system_store is not None:
                # As a worker without VQA_FETCH_CA_BUNDLE trusts: the system's store (here with the bench's certificate added).
                os.environ["SSL_CERT_FILE"] = str(system_store)
                policy = FetchPolicy(allowed_hosts=allowed, ca_bundle=None)
                figures["https_system_store_new_cpu_ms"] = cpu_ms_per_call(lambda _i, p=policy: fetch_bytes(url, p), max(1, args.fetches // 10),
                                                                   args.rounds)
    finally:
        for server in servers:
            server.kill()
    # What urllib3 does for a new https connection when it is given no context: build one and load the
    # system's trust store into it (the fetches share one context per trust store now).
    figures["system_trust_store_context_cpu_ms"] = cpu_ms_per_call(lambda _i: create_urllib3_context().load_default_certs(), 10, args.rounds)

    result = {
        **run_header("bench.fetchconn", argv, fetches_per_round=args.fetches, rounds=args.rounds),
        "image_bytes": (work / "images" / name).stat().st_size, **figures,
    }
    median = statistics.median
    rows = [f"| {scheme} | {median(figures[f'{scheme}_new_cpu_ms'])} | {median(figures[f'{scheme}_kept_cpu_ms'])} | "
            f"{figures[f'{scheme}_new_cpu_ms']} | {figures[f'{scheme}_kept_cpu_ms']} |" for scheme in ("http", "https")]
    text = "\n".join([
        "# One image fetch's CPU, new connection vs. kept (`python -m bench.fetchconn`)",
        "",
        f"Command: `{result['command']}`; {result['machine']} ({result['cores']} CPUs), Python {result['python']}; "
        f"{args.rounds} rounds of {args.fetches} fetches of a {result['image_bytes']:,}-byte JPEG from a keep-alive server on loopback, "
        "CPU ms per fetch (`time.process_time()`), one thread, after 20 unmeasured ones. Kept: every fetch after the very first "
        f"went over the kept connection ({figures['http_kept_reused']} and {figures['https_kept_reused']} reuses).",
        "",
        "| scheme | new connection per fetch (median) | kept connection (median) | rounds, new | rounds, kept |",
        "|---|---:|---:|---|---|",
        *rows,
        "",
        "With the system's trust store (`VQA_FETCH_CA_BUNDLE` unset, the bench's certificate added to it through SSL_CERT_FILE), "
        "an https fetch on a new connection: "
        + (f"{median(figures['https_system_store_new_cpu_ms'])} ms of CPU (rounds {figures['https_system_store_new_cpu_ms']})."
           if "https_system_store_new_cpu_ms" in figures else "not measured (no system CA bundle here)."),
        f"A TLS client context built and loaded with the system's trust store, what urllib3 does per connection when it is given "
        f"no context: {median(figures['system_trust_store_context_cpu_ms'])} ms of CPU (rounds {figures['system_trust_store_context_cpu_ms']}).",
        "",
    ])
    write_result(args.out, "fetch-keepalive", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
