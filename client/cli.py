"""`bild-client "prompt"`: stream a generation to the terminal as it settles."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from client.client import MODE_NAMES, BildClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bild-client", description=__doc__)
    p.add_argument("prompt", help="the text; with --chat, the user's message")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--system", help="a system message (implies --chat)")
    p.add_argument("--mode", choices=sorted(MODE_NAMES), help="(default: the server's)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="(default: the server's)")
    p.add_argument("--fallback-threshold", type=float)
    p.add_argument("--rollback-threshold", type=float)
    p.add_argument("--max-small-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 or unset: greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--logprobs", type=int, metavar="N", help="return each token's log-probability and N alternatives")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument(
        "--target",
        help="instead of --host/--port: ip:port of one server, several comma-separated (round robin over "
        "those that are SERVING, a refused call retried on another), or dns:///name:port with --balance",
    )
    p.add_argument("--balance", action="store_true", help="round robin over every address --target resolves to")
    p.add_argument("--tls", action="store_true", help="connect over TLS (implied by the PEM options)")
    p.add_argument("--ca-cert", help="PEM roots to trust instead of the system's")
    p.add_argument("--client-cert", help="PEM certificate for a server that asks for one (mutual TLS)")
    p.add_argument("--client-key", help="PEM private key of --client-cert")
    p.add_argument(
        "--api-key",
        default=os.environ.get("BILD_API_KEY"),
        help="sent as 'authorization: Bearer KEY' (default: $BILD_API_KEY)",
    )
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print each response message as one JSON object per line")
    p.add_argument("--stats", action="store_true", help="print the final statistics (to stderr)")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    messages = None
    prompt = args.prompt
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = None
    async with BildClient(
        args.target or f"{args.host}:{args.port}",
        balance=args.balance or None,
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        api_key=args.api_key,
    ) as client:
        last = None
        try:
            async for response in client.generate(
                prompt,
                messages=messages,
                max_new_tokens=args.max_new_tokens,
                mode=args.mode or 0,
                fallback_threshold=args.fallback_threshold,
                rollback_threshold=args.rollback_threshold,
                max_small_tokens=args.max_small_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                repetition_penalty=args.repetition_penalty,
                seed=args.seed,
                stop=args.stop,
                logprobs=args.logprobs is not None,
                top_logprobs=args.logprobs or 0,
                timeout=args.timeout,
            ):
                last = response
                if args.json:
                    print(json.dumps(MessageToDict(response, preserving_proto_field_name=True)), flush=True)
                else:
                    print(response.text, end="", flush=True)
        except grpc.aio.AioRpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if not args.json:
        print()
    if args.stats and last is not None:
        stats = MessageToDict(last.stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        print(json.dumps(stats, indent=2), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(run(parse_args(argv))))


if __name__ == "__main__":
    main()
