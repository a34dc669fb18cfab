"""`zeroc bench serve`: a load generator and report for the serving stack (docs/benchmarks/serve.md).

load.py (arrival times), workloads.py (requests from real held-out text), metrics.py (TTFT, TPOT,
ITL, JCT, throughput, goodput), methods.py (what is compared: model dirs and serve flags),
topology.py / netns.py (where the services run and the prefill -> decode link), runner.py (stacks
and the asyncio client), report.py (JSON, markdown, plots).
"""
