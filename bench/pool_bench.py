"""The reward worker pool: posttrain's own `WorkerPool` against pebble's `ProcessPool`.

    python bench/pool_bench.py                 # 3 rounds; prints a table
    python bench/pool_bench.py --rounds 5 --json out.json

math-verify runs in worker processes so that a hung `simplify` costs one item (a timeout),
not the run. Three pools do the same work, each in a fresh interpreter, taking turns:
- posttrain: `posttrain.rewards.pool.WorkerPool`, one fresh `python -m ...pool_worker`
  interpreter per worker, and a spare kept started once a worker has been killed;
- posttrain@f25f7a2: the same pool as it was (pool.py from git), without the spare;
- pebble (forkserver): `pebble.ProcessPool` on multiprocessing's forkserver, which imports
  math-verify once and forks every worker (and replacement) from it;
- pebble (spawn): the same on the spawn context, a fresh interpreter per worker.
(pebble's default on Linux, fork, would copy a trainer's threads and CUDA state: not measured.)

For each: `startup_s` (pool created to the first verdict), `items_per_s` on 200 answers that
need math-verify, `overhead_ms` per trivial item (the IPC cost), and the timeout figures: 40
answers plus 4 that hang, timeout 3 s: `timeout_batch_s`, `hangs_reported` (of 4) and
`wrong_or_lost` (real answers not judged, or judged otherwise than in-process), and
`after_timeouts_s`, the next 40 answers (the pool back at full strength or not). `reruns_main`: how many extra times a user's script without an
`if __name__ == "__main__":` guard runs when it uses the pool (spawn and forkserver import the
parent's main module in every worker; a fresh `python -m` interpreter does not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BASELINE, BENCH, in_subprocess, machine, old_modules

JUDGE = "pool_bench:judge"
POOLS = ("posttrain", f"posttrain@{BASELINE}", "pebble (forkserver)", "pebble (spawn)")
WORKERS = 2
HANG_TIMEOUT = 3.0  # seconds; generous, so that a real answer on a busy machine does not time out


def judge(gold: str, pred: str) -> bool:
    """math_judge.equivalent, except that gold `hang` sleeps (a pathological item)."""
    if gold == "hang":
        time.sleep(60)
    from posttrain.rewards.math_judge import equivalent

    return equivalent(gold, pred)


def trivial(x: int) -> int:
    return x


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    from rewards_bench import realistic_completions

    from posttrain.data_tools.answers import final_answer

    completions, golds = realistic_completions(n, seed=seed, hard=True)
    return [(g, final_answer(c) or "") for c, g in zip(completions, golds, strict=True)]


class PebblePool:
    """pebble's ProcessPool behind WorkerPool's interface: map(items, timeout) -> [Outcome]."""

    def __init__(self, target: str, processes: int, start_method: str) -> None:
        import importlib
        import multiprocessing

        import pebble

        context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            context.set_forkserver_preload(["math_verify", "sympy", "posttrain.rewards.math_judge"])
        module, _, name = target.partition(":")
        self.fn = getattr(importlib.import_module(module), name)
        self.pool = pebble.ProcessPool(max_workers=processes, context=context)

    def map(self, items: list[tuple], timeout: float) -> list[Any]:
        from concurrent.futures import TimeoutError

        from pebble import ProcessExpired

        from posttrain.rewards.pool import ERROR, OK, TIMEOUT, Outcome

        futures = [self.pool.schedule(self.fn, args=item, timeout=timeout) for item in items]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(Outcome(OK, future.result()))
            except TimeoutError:
                outcomes.append(Outcome(TIMEOUT, f"over {timeout:g}s"))
            except ProcessExpired:
                outcomes.append(Outcome(ERROR, "worker process died"))
            except Exception as e:
                outcomes.append(Outcome(ERROR, f"{type(e).__name__}: {e}"))
        return outcomes

    def close(self) -> None:
        self.pool.stop()
        self.pool.join()


def make_pool(name: str, target: str) -> Any:
    from posttrain.rewards.pool import WorkerPool

    if name == "posttrain":
        return WorkerPool(target, WORKERS, ("math_verify", "sympy"))
    if name.startswith("posttrain@"):
        commit = name.partition("@")[2]
        files = ["rewards/pool.py", "rewards/pool_worker.py"]
        package = old_modules(commit, files, f"pool_{commit}", Path(tempfile.mkdtemp()))
        old = __import__(f"{package}.pool", fromlist=["WorkerPool"])
        return old.WorkerPool(target, WORKERS, ("math_verify", "sympy"))
    return PebblePool(target, WORKERS, "forkserver" if "forkserver" in name else "spawn")


def one_run(name: str, seed: int) -> dict[str, Any]:
    """Every figure for pool `name`, in this fresh process."""
    import torch  # noqa: F401  (a trainer process has torch loaded: forking it is what must not happen)

    from posttrain.rewards.math_judge import equivalent

    work = pairs(200, seed)
    expected = [equivalent(g, p) for g, p in work[:80]]
    started = time.perf_counter()
    pool = make_pool(name, JUDGE)
    first = pool.map([("e^{2}", "e^2")], timeout=60.0)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    pool.map(work, timeout=30.0)
    items_per_s = len(work) / (time.perf_counter() - started)
    hung = [("hang", "x")] * 4
    batch = work[:20] + hung + work[20:40]
    started = time.perf_counter()
    outcomes = pool.map(batch, timeout=HANG_TIMEOUT)
    timeout_batch = time.perf_counter() - started
    started = time.perf_counter()
    after = pool.map(work[40:80], timeout=30.0)
    after_timeouts = time.perf_counter() - started
    real = outcomes[:20] + outcomes[24:] + after
    pool.close()
    overhead = ipc_overhead(name)
    return {
        "startup_s": startup,
        "first_ok": first[0].status == "ok",
        "items_per_s": items_per_s,
        "timeout_batch_s": timeout_batch,
        "hangs_reported": sum(o.status == "timeout" for o in outcomes[20:24]),
        "wrong_or_lost": sum(o.status != "ok" or o.value != e for o, e in zip(real, expected, strict=True)),
        "after_timeouts_s": after_timeouts,
        "overhead_ms": overhead,
    }


def ipc_overhead(name: str, n: int = 2000) -> float:
    """Milliseconds per item for an identity function: the pool's own cost per item."""
    pool = make_pool(name, "pool_bench:trivial")
    pool.map([(0,)], timeout=60.0)
    started = time.perf_counter()
    pool.map([(i,) for i in range(n)], timeout=30.0)
    seconds = time.perf_counter() - started
    pool.close()
    return 1000 * seconds / n


UNGUARDED = """
import sys
sys.path.insert(0, {bench!r})
print("BODY", flush=True)
from pool_bench import make_pool
pool = make_pool({name!r}, "pool_bench:trivial")
pool.map([(1,)], timeout=60.0)
pool.close()
"""


def reruns_main(name: str) -> int:
    """Extra runs of an unguarded user script's body caused by the pool's workers."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "user_script.py"
        script.write_text(UNGUARDED.format(bench=str(BENCH), name=name))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    return done.stdout.count("BODY") - 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--json", nargs="?", const="-", help="write the figures as JSON (to a file, or stdout)"
    )
    parser.add_argument("--one", nargs=2, metavar=("POOL", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]))))
        return
    runs: dict[str, list[dict]] = {name: [] for name in POOLS}
    for round_ in range(args.rounds):
        for name in POOLS:
            runs[name].append(in_subprocess(Path(__file__), ["--one", name, str(round_)]))
            print(f"round {round_ + 1}/{args.rounds} {name}: {runs[name][-1]}", file=sys.stderr)
    keys = ("startup_s", "items_per_s", "overhead_ms", "timeout_batch_s", "after_timeouts_s")
    figures = {
        name: {
            **{key: statistics.median(r[key] for r in rows) for key in keys},
            "hangs_reported": min(r["hangs_reported"] for r in rows),
            "wrong_or_lost": max(r["wrong_or_lost"] + (not r["first_ok"]) for r in rows),
        }
        for name, rows in runs.items()
    }
    for name in POOLS:
        figures[name]["reruns_main"] = reruns_main(name)
    if args.json:
        text = json.dumps({"machine": machine(), "figures": figures, "runs": runs}, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    print(
        f"\nreward worker pools, {WORKERS} workers, median of {args.rounds} interleaved rounds  ({machine()})"
    )
    print(
        "pool                 start-up s  items/s  ms/item (IPC)  44 items, 4 hang (s)  next 40 (s)"
        "  hangs seen  wrong/lost  re-runs main"
    )
    for name, f in figures.items():
        print(
            f"{name:20s} {f['startup_s']:10.2f} {f['items_per_s']:8.1f} {f['overhead_ms']:14.3f} "
            f"{f['timeout_batch_s']:21.2f} {f['after_timeouts_s']:12.2f}  {f['hangs_reported']:10d}"
            f"  {f['wrong_or_lost']:10d}  {f['reruns_main']}"
        )


if __name__ == "__main__":
    main()
