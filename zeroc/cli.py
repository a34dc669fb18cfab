"""The `zeroc` command.

User errors (a missing file, a bad config, an invalid flag value) print one line
``zeroc: error: ...`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from zeroc.config import ATTENTION_BACKENDS, BUNDLED_CALIB, BUNDLED_HELDOUT, ZeroCConfig, ZeroCError
from zeroc.policies import NONE, POLICY_NAMES, REGISTRY, make_policy  # the registry does not import torch

SERVING_POLICIES = " | ".join((NONE, *POLICY_NAMES))  # --help of the serving commands; make_policy checks them
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (env ZEROC_MODEL_DIR; "
                                                  "default: the bundled model)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (env ZEROC_DTYPE)")
    p.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS,
                   help="how the paged forward attends: auto (Triton on CUDA, else torch), torch (the PyTorch "
                        "references) or triton (on the CPU only under TRITON_INTERPRET=1) "
                        "(env ZEROC_ATTENTION_BACKEND)")


def _checked(cfg: ZeroCConfig) -> ZeroCConfig:
    """The settings that only the layers above the config can check (the KV policy's): ValueError."""
    make_policy(cfg.cache)
    return cfg


def _root_config(args: argparse.Namespace, cache: dict | None = None) -> ZeroCConfig:
    return _checked(ZeroCConfig.from_env(model_dir=args.model, dtype=args.dtype,
                                         attention_backend=getattr(args, "attention_backend", None),
                                         cache=cache or {"block_size": getattr(args, "block_size", None)}))


def _load(args: argparse.Namespace, cache: dict | None = None):
    from zeroc.loader import load_model

    cfg = _root_config(args, cache)
    return load_model(cfg.model_dir, cfg.dtype, attention_backend=cfg.attention_backend), cfg


def _byte_size(text: str) -> int:
    """"1073741824", "512M", "1G", "1GiB" -> bytes (binary units)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _UNITS.get(raw[-1:], 1)
    try:
        value = float(raw[:-1] if raw[-1:] in _UNITS else raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1073741824, 512M, 1G)") from None
    return int(value)


def _cache_settings(args: argparse.Namespace) -> dict:
    """The cache section of the config from serving flags (None: environment or default)."""
    policy = args.kv_policy or os.environ.get("ZEROC_CACHE_KV_POLICY", NONE)
    block = args.block_size
    if block is None and policy in REGISTRY and "ZEROC_CACHE_BLOCK_SIZE" not in os.environ:
        block = REGISTRY[policy].block_size  # the block size the method needs (KIVI: its group), else the default
    return {"block_size": block, "num_blocks": getattr(args, "num_blocks", None), "num_bytes": args.cache_bytes,
            "kv_policy": args.kv_policy, "kv_budget": args.kv_budget, "kv_max_tokens": args.kv_max_tokens,
            "kv_residual": args.kv_residual}


def cmd_train(args: argparse.Namespace) -> int:
    from zeroc.train.trainer import TrainConfig, train

    cfg = TrainConfig(minutes=args.minutes, max_steps=args.max_steps, seq_len=args.seq_len,
                      batch_size=args.batch_size, hidden_size=args.hidden_size, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
                      vocab_size=args.vocab_size, lr=args.lr, seed=args.seed)
    data_dir = Path(args.data_dir) if args.data_dir else None
    summary = train(Path(args.corpus), Path(args.out), data_dir, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from zeroc.compression.calibrate import ZeroCMethod, calibrate
    from zeroc.loader import save_model

    method = ZeroCMethod(budget=args.budget, mode=args.mode, rank_multiple=args.rank_multiple,
                         calib_tokens=args.tokens, sensitivity_tokens=args.sensitivity_tokens, window=args.window,
                         ablation_tokens=args.ablation_tokens, sinks=args.sinks, recent=args.recent,
                         granularity=args.rank_granularity)
    loaded, _ = _load(args)
    compressed, report = calibrate(loaded, args.calib, method, progress=not args.json)
    out = save_model(compressed, loaded.tokenizer, args.out)
    (out / "calibration.json").write_text(json.dumps({"method": asdict(method), **asdict(report)}, indent=2) + "\n")
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(f"wrote {out}: KV {report.kv_fraction:.3f} of uncompressed, ranks (qk, v) per layer {report.ranks}, "
              f"Q/K modes {report.modes}, calibration loss {report.base_loss:.4f} -> {report.compressed_loss:.4f}"
              + (f"; full-rank tier: {method.sinks} sinks + {method.recent} recent tokens"
                 if method.sinks or method.recent else ""))
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from zeroc.eval.perplexity import perplexity_full, perplexity_streaming
    from zeroc.data import read_eval_tokens
    from zeroc.policies import cache_config, method_at_budget

    if args.kv_policy != NONE and not args.streaming:
        raise ZeroCError("--kv-policy needs --streaming (policies decide what a token-by-token cache keeps)")
    if args.kv_policy == NONE and args.kv_budget != 1.0:
        raise ZeroCError("--kv-budget needs a --kv-policy")
    loaded, _ = _load(args)
    tokens = read_eval_tokens(loaded.tokenizer, args.data, args.max_tokens)
    show = not args.json
    if args.kv_policy != NONE:  # the serving cache and store, at the hyperparameters that hold the budget
        method = method_at_budget(args.kv_policy, args.kv_budget, loaded.config, args.ctx)  # ValueError: one line
        res = perplexity_streaming(loaded.model, tokens, args.ctx, args.batch_size, progress=show,
                                   cache=cache_config(method))
        if args.json:
            print(json.dumps({**res.to_dict(), "budget": args.kv_budget, "label": method.label}))
        else:
            print(f"perplexity {res.perplexity:.4f} (streaming, {method.label} at budget {args.kv_budget}: KV held "
                  f"{res.kv_fraction_mean:.3f} of fp16 on average; {res.tokens} tokens, {res.windows} windows "
                  f"of {res.ctx})")
        return 0
    if args.streaming:
        result = perplexity_streaming(loaded.model, tokens, args.ctx, args.batch_size, progress=show)
    else:
        result = perplexity_full(loaded.model, tokens, args.ctx, progress=show)
    from zeroc.tier import tier_kv_fraction

    kv = tier_kv_fraction(loaded.config, args.ctx)  # a token tier's full-rank rows included
    if args.json:
        print(json.dumps({**result.to_dict(), "kv_fraction": kv}))
    else:
        print(f"perplexity {result.perplexity:.4f} ({result.mode}, {result.tokens} tokens, "
              f"{result.windows} windows of {result.ctx}; KV {kv:.4f} of uncompressed at ctx {args.ctx})")
    return 0


def cmd_eval_quality(args: argparse.Namespace) -> int:
    import datetime as dt

    from zeroc.compression.calibrate import ZeroCMethod
    from zeroc.eval.quality import QualityConfig, machine_description, run_quality
    from zeroc.eval.quality_report import text_table, write_report

    cfg = QualityConfig(ctx=args.ctx, max_tokens=args.max_tokens, budgets=tuple(args.budgets),
                        batch_size=args.batch_size, zeroc_modes=tuple(args.zeroc_modes),
                        calibration=ZeroCMethod(rank_multiple=args.rank_multiple, calib_tokens=args.calib_tokens,
                                                sensitivity_tokens=args.sensitivity_tokens, window=args.window,
                                                granularity=args.rank_granularity))
    loaded, _ = _load(args)
    started = dt.datetime.now(dt.timezone.utc)
    rows = run_quality(loaded, args.calib, args.data, cfg, progress=not args.json)
    minutes = (dt.datetime.now(dt.timezone.utc) - started).total_seconds() / 60
    meta = {"model": loaded.path.name, "data": Path(args.data).name, "calibration text": Path(args.calib).name,
            "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_description(),
            "command": "zeroc eval quality " + " ".join(args.argv), "windows": f"ctx {cfg.ctx}, max tokens "
            f"{cfg.max_tokens}", "ZeroC calibration": str(cfg.calibration), "wall time": f"{minutes:.1f} min"}
    md, png = write_report(rows, Path(args.out_dir), meta)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "markdown": str(md), "plot": str(png), **meta}))
    else:
        print(text_table(rows))
        print(f"wrote {md} and {png}")
    return 0


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from zeroc.bench.forward import run_forward_bench

    loaded, _ = _load(args)
    report = run_forward_bench(loaded, tuple(args.prefill), tuple(args.decode_batch))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['model']}: {report['parameters'] / 1e6:.1f}M parameters, {report['dtype']}, "
          f"{report['threads']} threads")
    for r in report["results"]:
        what = f"prefill {r['tokens']} tokens" if r["name"] == "prefill" else f"decode batch {r['tokens']}"
        print(f"  {what:<22} {r['tokens_per_s']:>10.1f} tokens/s  {r['ms_per_step']:>9.2f} ms/step")
    return 0


def cmd_bench_attention(args: argparse.Namespace) -> int:
    from zeroc.bench.attention import LLAMA3_8B, AttentionBenchConfig, bundled_shape, run_attention_bench, text_report

    bench = AttentionBenchConfig(prefill_tokens=args.prefill_tokens, decode_batch=args.decode_batch,
                                 context=args.context, rank_ratio=args.rank_ratio, repeats=args.repeats,
                                 threads=args.threads)
    shapes = [bundled_shape() if name == "zeroc-tiny" else LLAMA3_8B for name in dict.fromkeys(args.shapes)]
    report = run_attention_bench(bench, shapes, progress=not args.json)
    print(json.dumps(report) if args.json else text_report(report))
    return 0


def cmd_bench_transfer(args: argparse.Namespace) -> int:
    from zeroc.bench.transfer import TransferSpec, run_transfer_bench

    spec = TransferSpec(tokens=args.tokens, layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        dtype=args.kv_dtype, chunk_bytes=args.chunk_bytes)
    if min(spec.tokens, spec.layers, spec.kv_heads, spec.head_dim, args.rounds, args.repeats) < 1 \
            or spec.chunk_bytes < 1024:
        raise ZeroCError("--tokens, --layers, --kv-heads, --head-dim, --rounds and --repeats must be >= 1, "
                         "--chunk-bytes >= 1024")
    report = run_transfer_bench(spec, args.rounds, args.repeats, progress=not args.json)
    if args.json:
        print(json.dumps(report))
        return 0
    mb, cpu, eff = 1 << 20, report["median_cpu_s_per_gib"], report["median_cpu_ratio_vs_raw"]
    print(f"KV of {spec.tokens} tokens x {spec.layers} layers x {spec.kv_heads}x{spec.head_dim} {spec.dtype}: "
          f"{report['payload_bytes'] / mb:.1f} MiB per prompt, {spec.bytes_per_token} bytes per prompt token; "
          f"{args.repeats} repeats x {args.rounds} prompts per path, load average {report['load_average_1m'][0]:.1f}")
    print(f"                       {'MiB/s':>9}  {'/ raw':>6}  {'CPU s/GiB':>9}  {'raw CPU / CPU':>13}")
    print(f"  gRPC Prefill stream  {report['grpc_bytes_per_s'] / mb:>9.1f}  {report['median_grpc_over_raw']:>6.2f}  "
          f"{cpu['grpc']:>9.2f}  {eff['grpc']:>13.2f}")
    print(f"  bare gRPC bytes      {report['bare_grpc_bytes_per_s'] / mb:>9.1f}  "
          f"{report['median_bare_grpc_over_raw']:>6.2f}  {cpu['bare_grpc']:>9.2f}  {eff['bare_grpc']:>13.2f}")
    print(f"  raw TCP socket       {report['raw_tcp_bytes_per_s'] / mb:>9.1f}  {1:>6.2f}  {cpu['raw_tcp']:>9.2f}")
    print("  (ratios are medians over repeats; bare gRPC is the ceiling for gRPC in Python on this host)")
    return 0


def cmd_bench_prefix(args: argparse.Namespace) -> int:
    from zeroc.bench.prefix import PrefixBenchSpec, run_prefix_bench

    spec = PrefixBenchSpec(tokens=args.tokens, shared=args.shared, rounds=args.rounds, index_ops=args.index_ops)
    report = run_prefix_bench(spec, progress=not args.json)
    if args.plot:
        from zeroc.bench.prefix import plot_ttft

        plot_ttft(report, args.plot)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"TTFT, {spec.tokens}-token prompts, {spec.shared:.0%} shared prefix (median of {spec.rounds}):")
    for mode, r in report["ttft"].items():
        print(f"  {mode:<14} cold {r['cold_ttft_ms']:>8.1f} ms   warm {r['warm_ttft_ms']:>8.1f} ms   "
              f"warm/cold {r['warm_over_cold']:.3f}   ({r['warm_cached_tokens']} tokens reused)")
    print("index operations (embedded Redis, unix socket, one connection):")
    for name, r in report["index"].items():
        if isinstance(r, dict):
            print(f"  {name:<18} p10 {r['p10_us']:>7.0f} us   p50 {r['p50_us']:>7.0f} us   p99 {r['p99_us']:>7.0f} us   "
                  f"redis {r['server_us_per_op']:>6.0f} us/op")
        else:
            print(f"  {name:<40} {r:>8.0f}")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from zeroc.bench.serve.command import run

    return run(args)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.target:
        return _generate_remote(args)
    from zeroc.engine import Engine
    from zeroc.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()))
    loaded, cfg = _load(args, _cache_settings(args))
    engine = Engine(loaded, cfg.cache, cfg.scheduler)
    request_id = engine.add_request(args.prompt, params)
    tokens: list[int] = []
    text, reason = "", None
    if not args.json:
        print(args.prompt, end="", flush=True)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
            text += out.text_delta
            reason = out.finish_reason if out.finished else reason
            if not args.json:
                print(out.text_delta, end="", flush=True)
    if args.json:
        print(json.dumps({"request_id": request_id, "text": text, "token_ids": tokens, "finish_reason": reason}))
    else:
        print(f"\n[finish_reason={reason}, {len(tokens)} tokens]")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    from zeroc.client import Chunk, Client, ClientError

    out: list = []
    try:
        ca = Path(args.ca).read_bytes() if args.ca else None
        token = args.token or os.environ.get("ZEROC_TOKEN") or None
        with Client(args.target, timeout=args.timeout, token=token, ca=ca) as client:
            if not args.json:
                print(args.prompt, end="", flush=True)
            for item in client.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or ()):
                out.append(item)
                if isinstance(item, Chunk) and not args.json:
                    print(item.text, end="", flush=True)
    except ClientError as exc:
        raise ZeroCError(f"{args.target}: {exc}") from None
    chunks, result = [c for c in out if isinstance(c, Chunk)], out[-1]
    tokens = [t for c in chunks for t in c.token_ids]
    if args.json:
        print(json.dumps({"request_id": result.request_id, "text": "".join(c.text for c in chunks),
                          "token_ids": tokens, "finish_reason": result.finish_reason,
                          "usage": vars(result.usage)}))
    else:
        print(f"\n[finish_reason={result.finish_reason}, {len(tokens)} tokens, "
              f"ttft {result.usage.ttft_ms:.1f} ms]")
    return 0


def _service_config(args: argparse.Namespace) -> ZeroCConfig:
    prefill = getattr(args, "prefill", None)
    return _checked(ZeroCConfig.from_env(
        model_dir=args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        cache=_cache_settings(args),
        server={"host": args.host, "port": args.port, "max_queue": args.max_queue, "grace_s": args.grace_s,
                "max_message_mb": args.max_message_mb},
        transfer={"prefill_target": "" if getattr(args, "colocated", False) else prefill,
                  "kv_transport": args.kv_transport, "prefill_fallback": getattr(args, "prefill_fallback", None)},
        redis={"url": args.redis_url}, store={"capacity_mb": args.kv_store_mb},
        parallel={"sp_ranks": getattr(args, "sp", None)},
        security={"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
                  "tokens_file": args.tokens_file}))


def cmd_serve(args: argparse.Namespace) -> int:
    from zeroc.rpc import setup_logging

    cfg = _service_config(args)
    if args.what == "decode" and not args.colocated and not cfg.transfer.prefill_target:
        raise ZeroCError("serve decode needs --prefill HOST:PORT (or env ZEROC_TRANSFER_PREFILL_TARGET), "
                         "or --colocated")
    if args.what == "prefill" and cfg.parallel.sp_ranks > 1 and cfg.device != "cpu":
        raise ZeroCError("--sp runs its ranks on gloo and needs --device cpu")
    if args.what == "prefill" and cfg.parallel.sp_ranks > 1 and cfg.cache.kv_policy != "none":
        raise ZeroCError("--sp computes plain attention; it does not run --kv-policy caches")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ZeroCError(f"--device {cfg.device}: torch sees no CUDA device")
    if args.what == "prefill" or cfg.transfer.prefill_target:
        from zeroc.transport.landing import check_transfer

        check_transfer(cfg.cache)  # ValueError: this policy's KV cannot travel
    setup_logging()
    if os.environ.get("ZEROC_EXIT_WITH_PARENT"):
        from zeroc.rpc import stop_with_parent

        stop_with_parent(int(os.environ["ZEROC_EXIT_WITH_PARENT"]))
    if args.what == "prefill":
        from prefill_service.server import serve
    else:
        from decode_service.server import serve
    serve(cfg, ready=lambda line: print(line, flush=True))
    return 0


def cmd_stack_up(args: argparse.Namespace) -> int:
    from zeroc.stack import Stack, die_with_parent

    if args.decode < 1:
        raise ZeroCError(f"--decode must be >= 1, got {args.decode}")
    extra = [a for flag, v in (("--model", args.model), ("--dtype", args.dtype)) if v for a in (flag, v)]
    if args.redis_url:
        ZeroCConfig.from_env(redis={"url": args.redis_url})  # a bad URL is a one-line error here
    gateway = (["--model", args.model] if args.model else []) if args.gateway else None
    die_with_parent()  # `make run` signalled: SIGTERM here too, so the services and Redis stop with it
    with Stack(args.decode, extra, redis_url=args.redis_url, gateway_args=gateway, tls=args.tls) as stack:
        print(f"kv store index:  {stack.redis_url}" + (" (embedded)" if stack.redis else ""))
        if stack.pki is not None:
            print(f"tls ca:          {stack.pki.ca} (throwaway; clients pass it to verify the services)")
        print(f"prefill service: {stack.prefill}")
        for addr in stack.decode:
            print(f"decode service:  {addr}")
        if stack.gateway:
            from zeroc.gateway.command import curl_line

            print(f"gateway:         {stack.gateway} (OpenAI API)\ntry: {curl_line(stack.gateway, args.prompt, args.model)}")
        print(f"ready; try: zeroc generate --target {stack.decode[0]} \"{args.prompt}\"", flush=True)
        return stack.wait()


def _serve_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--host", default=None, help="address to listen on (env ZEROC_SERVER_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (env ZEROC_SERVER_PORT; 0 picks a free one)")
    p.add_argument("--max-queue", type=int, default=None, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--grace-s", type=float, default=None, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--max-message-mb", type=int, default=None, help="largest gRPC message, in MiB")
    p.add_argument("--block-size", type=int, default=None, help="KV cache block size")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N: where the model runs (env ZEROC_DEVICE)")
    p.add_argument("--kv-transport", choices=["grpc", "nccl", "auto"], default=None,
                   help="how prompt KV travels between prefill and decode: in-band gRPC, NCCL between GPUs "
                        "(CUDA IPC on a shared GPU), or auto: NCCL when both peers have GPUs "
                        "(env ZEROC_TRANSFER_KV_TRANSPORT; default auto)")
    _kv_policy_args(p)
    _redis_arg(p)
    p.add_argument("--kv-store-mb", type=int, default=None,
                   help="KV store block pool in MiB, 0 turns prefix reuse off (env ZEROC_STORE_CAPACITY_MB; default 256)")
    for name in ("ca", "cert", "key"):  # docs/security.md
        p.add_argument(f"--tls-{name}", default=None, help=f"PEM file: TLS {name} (env ZEROC_SECURITY_TLS_{name.upper()})")
    p.add_argument("--tokens-file", default=None,
                   help="bearer tokens of the public API, 'TOKEN TENANT' lines (env ZEROC_SECURITY_TOKENS_FILE)")


def _redis_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None,
                   help="KV store index: redis://, rediss:// (TLS), unix://, redis+sentinel://HOST:PORT/MASTER, or "
                        "'off' (env ZEROC_REDIS_URL; default: an embedded redis-server)")


def _kv_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-policy", default=None, metavar="NAME",
                   help=f"what the KV cache stores: {SERVING_POLICIES} (env ZEROC_CACHE_KV_POLICY; "
                        "docs/policies.md, 'In serving')")
    p.add_argument("--kv-budget", type=float, default=None,
                   help="h2o, streamingllm, snapkv: tokens kept as a fraction of those seen; palu: latent rank as a "
                        "fraction of the head dim; in (0, 1] (env ZEROC_CACHE_KV_BUDGET)")
    p.add_argument("--kv-max-tokens", type=int, default=None,
                   help="h2o: at most this many tokens per sequence (0: no cap; env ZEROC_CACHE_KV_MAX_TOKENS)")
    p.add_argument("--kv-residual", type=int, default=None,
                   help="kivi: full-precision tokens kept besides the filling block, a multiple of the block "
                        "size (default 0; env ZEROC_CACHE_KV_RESIDUAL)")
    p.add_argument("--cache-bytes", type=_byte_size, default=None,
                   help="KV cache capacity in bytes (e.g. 1G), instead of --num-blocks: the blocks that fit "
                        "depend on the policy (env ZEROC_CACHE_NUM_BYTES)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    """Train: the bundled model from a corpus."""
    p = sub.add_parser("train", help="train the bundled model (tokenizer + Llama) on a text corpus")
    p.add_argument("--corpus", default="/usr/share/doc/python3.11/html/_sources")
    p.add_argument("--out", default="models/zeroc-tiny")
    p.add_argument("--data-dir", default="data", help="where heldout.txt and calib.txt are written ('' to skip)")
    p.add_argument("--minutes", type=float, default=55.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)


def _granularity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank-granularity", choices=["head", "layer"], default="head",
                   help="ZeroC ranks per KV head (default; measures each head's sensitivity: kv_heads times the "
                        "passes) or one per layer for all its heads")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    """Calibrate: ZeroC compression."""
    p = sub.add_parser("calibrate", help="compress a model's attention (ZeroC) and save it")
    _model_arg(p)
    p.add_argument("--calib", default=str(BUNDLED_CALIB), help="calibration text file")
    p.add_argument("--budget", type=float, required=True, help="KV cache size as a fraction of uncompressed")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--mode", choices=["fold", "rotate", "auto"], default="auto",
                   help="Q/K: keep RoPE pairs (fold), post-RoPE bases (rotate), or per layer by measured KL (auto)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens for the statistics")
    p.add_argument("--sensitivity-tokens", type=int, default=2048, help="tokens for per-layer sensitivity")
    p.add_argument("--window", type=int, default=512, help="calibration window length")
    p.add_argument("--ablation-tokens", type=int, default=1024, help="tokens whose activations rank RoPE pairs (fold)")
    p.add_argument("--rank-multiple", type=int, default=None,
                   help="ranks are multiples of this (default: 8 up to head_dim 64, else 16)")
    _granularity_arg(p)
    p.add_argument("--sinks", type=int, default=0,
                   help="token tier: first tokens kept at full rank for every query (default 0 = off)")
    p.add_argument("--recent", type=int, default=0,
                   help="token tier: each query's last tokens kept at full rank, compressed once they age out "
                        "(default 0 = off; served too, without prefix reuse: docs/compression.md)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """Eval ppl | quality."""
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity on a text file")
    _model_arg(p)
    p.add_argument("--data", default=str(BUNDLED_HELDOUT))
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--streaming", action="store_true", help="token by token through the paged cache")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="windows decoded together in streaming mode")
    p.add_argument("--kv-policy", default="none", choices=[NONE, *POLICY_NAMES],
                   help="KV-cache baseline deciding what attention sees (needs --streaming)")
    p.add_argument("--kv-budget", type=float, default=1.0, help="KV bytes as a fraction of the fp16 cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("quality", help="perplexity of ZeroC and every baseline at equal KV budgets -> docs/")
    _model_arg(p)
    p.add_argument("--calib", default=str(BUNDLED_CALIB), help="calibration text for ZeroC")
    p.add_argument("--data", default=str(BUNDLED_HELDOUT), help="held-out text to score")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.375, 0.25])
    p.add_argument("--batch-size", type=int, default=16, help="windows streamed together")
    p.add_argument("--calib-tokens", type=int, default=16384, help="ZeroC calibration tokens for the statistics")
    p.add_argument("--sensitivity-tokens", type=int, default=2048, help="ZeroC tokens for per-layer sensitivity")
    p.add_argument("--window", type=int, default=512, help="ZeroC calibration window length")
    p.add_argument("--rank-multiple", type=int, default=None,
                   help="ZeroC ranks are multiples of this (default: 8 up to head_dim 64, else 16)")
    _granularity_arg(p)
    p.add_argument("--zeroc-modes", nargs="+", choices=["fold", "rotate", "auto"], default=["auto"],
                   help="ZeroC Q/K modes to tabulate (rows zeroc[-MODE] and zeroc[-MODE]-int8; auto is plain zeroc)")
    p.add_argument("--out-dir", default="docs", help="where quality.md and quality.png go")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_quality)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """Bench forward | attention | transfer | serve | prefix."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    p = bench.add_parser("forward", help="prefill and decode tokens/s")
    _model_arg(p)
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048], help="prompt lengths to prefill")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_forward)
    p = bench.add_parser("attention", help="attention-block time: uncompressed vs ZeroC fold/rotate vs KIVI 4-bit")
    p.add_argument("--shapes", nargs="+", choices=["zeroc-tiny", "llama3-8b"], default=["zeroc-tiny", "llama3-8b"],
                   help="layer shapes: the bundled model's, Llama-3-8B's (random weights)")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--context", type=int, default=2048, help="tokens each decoding sequence holds")
    p.add_argument("--rank-ratio", type=float, default=0.5, help="ZeroC rank as a fraction of head_dim")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method (best is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_attention)
    p = bench.add_parser("transfer", help="KV bytes/s: Prefill gRPC stream vs raw TCP on loopback")
    p.add_argument("--tokens", type=int, default=512, help="prompt tokens per transfer")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk-bytes", type=int, default=2 << 20)
    p.add_argument("--rounds", type=int, default=3, help="prompts per path per repeat")
    p.add_argument("--repeats", type=int, default=5, help="paths run back to back this many times; ratios are medians")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_transfer)
    p = bench.add_parser("serve", help="load test of the serving stack: JCT, TTFT, TPOT, goodput -> docs/benchmarks/")
    from zeroc.bench.serve.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench_serve)

    from zeroc.bench import gateway as gateway_bench

    p = bench.add_parser("gateway", help="TTFT, TPOT, throughput through the HTTP gateway vs straight gRPC")
    gateway_bench.add_arguments(p)
    p.set_defaults(func=gateway_bench.run)

    from zeroc.bench import engine as bench_engine

    p = bench.add_parser("engine", help="the Engine end to end on random weights: step vs floor, host ms, syncs")
    bench_engine.add_arguments(p)
    p.set_defaults(func=bench_engine.run)

    from zeroc.bench import chaos as bench_chaos

    p = bench.add_parser("chaos", help="bounded load while services are killed, stopped and cut off -> docs/benchmarks.md")
    bench_chaos.add_arguments(p)
    p.set_defaults(func=bench_chaos.run)

    p = bench.add_parser("prefix", help="TTFT cold vs warm with a shared prompt prefix; KV-store index op costs")
    p.add_argument("--tokens", type=int, default=1024, help="prompt length in tokens")
    p.add_argument("--shared", type=float, default=0.9, help="fraction of the prompt shared with the warm prompt")
    p.add_argument("--rounds", type=int, default=3, help="cold/warm pairs per mode (the median is reported)")
    p.add_argument("--index-ops", type=int, default=2000, help="operations per index measurement")
    p.add_argument("--plot", default=None, help="also write the TTFT bar chart to this PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_prefix)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """Generate: one completion, local or remote."""
    p = sub.add_parser("generate", help="complete a prompt with a local model")
    _model_arg(p)
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--block-size", type=int, default=None, help="KV cache block size (env ZEROC_CACHE_BLOCK_SIZE)")
    _kv_policy_args(p)
    p.add_argument("--target", default=None, help="HOST:PORT of a decode service (default: run locally)")
    p.add_argument("--ca", default=None, help="with --target: PEM of the CA that signed the service (TLS)")
    p.add_argument("--token", default=None, help="with --target: bearer token (env ZEROC_TOKEN)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds with --target")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """Serve prefill | decode."""
    serve = sub.add_parser("serve", help="run a gRPC service").add_subparsers(dest="what", required=True)
    p = serve.add_parser("prefill", help="the prefill service (streams prompt KV to decode services)")
    _serve_args(p)
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel ranks: run each prompt on this many "
                                                        "gloo processes (env ZEROC_PARALLEL_SP_RANKS; default 1)")
    p.set_defaults(func=cmd_serve)
    p = serve.add_parser("decode", help="the decode service (the entry point clients call)")
    _serve_args(p)
    p.add_argument("--prefill", default=None, help="HOST:PORT of the prefill service")
    p.add_argument("--colocated", action="store_true", help="prefill locally; no prefill service")
    p.add_argument("--prefill-fallback", choices=["local", "fail"], default=None,
                   help="while the prefill service is unavailable: prefill locally (default) or fail the request "
                        "(env ZEROC_TRANSFER_PREFILL_FALLBACK)")
    p.set_defaults(func=cmd_serve)
    from zeroc.gateway import command as gateway

    p = serve.add_parser("gateway", help="the OpenAI-compatible HTTP API in front of decode services")
    gateway.add_arguments(p)
    p.set_defaults(func=gateway.run)


def _add_stack(sub: argparse._SubParsersAction) -> None:
    """Stack up: a local deployment."""
    stack = sub.add_parser("stack", help="a local deployment").add_subparsers(dest="what", required=True)
    p = stack.add_parser("up", help="one prefill and N decode services on localhost, until Ctrl-C")
    _model_arg(p)
    p.add_argument("--decode", type=int, default=1, help="decode services to start")
    _redis_arg(p)
    p.add_argument("--prompt", default="The built-in function", help="prompt shown in the hint")
    p.add_argument("--gateway", action="store_true", help="also run the OpenAI-compatible HTTP gateway")
    p.add_argument("--tls", action="store_true", help="TLS on every port and mTLS between the services, with a "
                   "throwaway CA and certificate made for this run (docs/security.md)")
    p.set_defaults(func=cmd_stack_up)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroc", description="ZeroC serving: compressed-KV LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_calibrate(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_stack(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv[2:] if argv[:2] == ["eval", "quality"] else argv
    try:
        return args.func(args)
    except ZeroCError as exc:
        print(f"zeroc: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid parameter values from config dataclasses
        print(f"zeroc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
