"""The benchmark suite: `python -m bench.run` (see bench/README.md).

Modules: `run` (the orchestrator and the report), `scenario` (the one stage every process
agrees on), `backend` (the fake OpenAI server), `service_proc` (the service under test),
`floor` (the bare in-process openai loop), `ceiling_proc` (grpc.aio doing no work),
`loadgen` (the gRPC load generator), `driver` (the closed-loop harness), `checks` (response
checks), `procs` / `common` (process plumbing), `profile` (py-spy on the service);
`local_model` measures the embedded model's aggregate tokens/s at 1, 2 and 4 concurrent stages;
`quality` measures its tool-calling quality on a prompt set of its own.
"""
