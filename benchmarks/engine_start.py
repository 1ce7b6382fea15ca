"""How long an `LLM` takes to build with 1, 2, 3... engine processes per GPU (`engines_per_gpu`),
and, for several engines, each worker's start: seconds from spawning to ready, of which importing
the engine and building it (`DataParallelEngine.start_times`).

    PYTHONPATH=. python3 benchmarks/engine_start.py 1 2 3 2 1        # the SmolLM2-135M shape, dummy weights
    PYTHONPATH=. python3 benchmarks/engine_start.py --device cpu 1 2            # here, on CPU
    PYTHONPATH=. python3 benchmarks/engine_start.py --profile 1     # where one in-process build's time goes
    PYTHONPATH=. python3 benchmarks/engine_start.py --tokenizer DIR 1 2    # with a tokenizer, as `run` builds them

Each count builds one LLM in this process, one after another; the first build on a fresh machine
pays Triton's cold compiles, and in-process builds after the first reuse loaded kernels, so compare
counts from the same process in both orders.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", type=int, nargs="+", help="engines per GPU, one build each, in order")
    parser.add_argument("--model", default="benchmarks/configs/smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokenizer", default=None,
                        help="load this tokenizer in each engine, as `batchllm run`'s engines do (default: none)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile each one-engine build (in this process) and print its top functions")
    args = parser.parse_args()

    from batchllm import LLM
    from batchllm.parallel.data_parallel import describe_start

    for n in args.engines:
        profiler = cProfile.Profile() if args.profile and n == 1 else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        tokenizer = {"tokenizer": args.tokenizer} if args.tokenizer else {"skip_tokenizer_init": True}
        llm = LLM(args.model, load_format="dummy", device=args.device, engines_per_gpu=n, **tokenizer)
        built = time.perf_counter() - started
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(60)
        if llm.engine is not None:  # (in this process: its build's phases)
            workers = {0: {"build_s": built, "build_phases": llm.engine.build_seconds}}
        else:
            workers = llm._data_parallel.start_times
        parts = "; ".join(f"rank {r}: {describe_start(t)}" for r, t in sorted(workers.items()))
        print(f"{n} engine(s): built in {built:.2f} s" + (f" ({parts})" if parts else ""), flush=True)
        llm.shutdown()


if __name__ == "__main__":  # the workers are spawned: they import this module without running it
    main()
