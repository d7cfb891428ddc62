"""Development tools shared by the tests and the benchmarks; not part of the installed addon.

* `tools.mock_cerebras`: a local stand-in for the Cerebras API (token buckets by Cerebras's
  rule, 429 bodies, usage, streaming); `python -m tools.mock_cerebras --help`.
* `tools.loadgen`: a load generator that offers a mix of chat requests to the proxy (or the
  mock) and reports and draws what came back; `python -m tools.loadgen --help`.
* `tools.launch`: starts and stops mitmdump (with or without Cooldown) for tests and benchmarks.
* `tools.redis_server`: a throwaway redis-server on a free 127.0.0.1 port (nothing on disk),
  killed and started again on the same port by the shared-limits tests and benchmark.
* `tools.core_harness`: the scheduler + limiter decision cycle with N held requests, measured
  by the benchmarks and counted by the performance regression test.

Run the commands from the repository root (which puts `tools` on the import path); the package
is not installed (pyproject.toml installs only `cooldown`).
"""
