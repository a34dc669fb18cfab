"""`zeroc bench ...`: the benchmarks (zeroc/bench/)."""

from __future__ import annotations

import argparse
import json

from zeroc.cli import common
from zeroc.config import ZeroCError


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from zeroc.bench.forward import run_forward_bench

    loaded, _ = common.load(args)
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
    print(f"  gRPC + chunk MACs    {report['grpc_mac_bytes_per_s'] / mb:>9.1f}  {'':>6}  "
          f"{cpu['grpc_mac']:>9.2f}  {eff['grpc_mac']:>13.2f}")
    print(f"  bare gRPC bytes      {report['bare_grpc_bytes_per_s'] / mb:>9.1f}  "
          f"{report['median_bare_grpc_over_raw']:>6.2f}  {cpu['bare_grpc']:>9.2f}  {eff['bare_grpc']:>13.2f}")
    print(f"  raw TCP socket       {report['raw_tcp_bytes_per_s'] / mb:>9.1f}  {1:>6.2f}  {cpu['raw_tcp']:>9.2f}")
    print(f"  MACs: gRPC + MACs / gRPC {report['median_grpc_mac_over_grpc']:.2f} (wall), "
          f"{report['median_cpu_ratio_mac']:.2f} (CPU)")
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


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Bench forward | attention | transfer | serve | prefix."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    p = bench.add_parser("forward", help="prefill and decode tokens/s")
    common.model_args(p)
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
