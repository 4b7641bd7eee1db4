"""Count the matrix-multiply and convolution FLOPs of one Hessian-vector product, in gradients.

A timing measures how long a product took on one machine, while a FLOP
count gives how much arithmetic it needs on any machine. This script counts, with
``torch.utils.flop_counter.FlopCounterMode``, the FLOPs of the matrix
products and convolutions (the bulk of the work; elementwise operations are
not counted) of:

- one gradient, the unit;
- the gradient built with ``create_graph=True``, which reverse-over-reverse
  pays once per trace when its graph is kept;
- one reverse-over-reverse product through that kept graph, what PyHessian
  and hutch's ``hvp="auto"`` pay per probe;
- one ``jvp(grad)`` product, which reruns the forward and backward pass;
- one product of ``vmap(jvp(grad))`` over a block of probes, per probe: the
  primal passes run once per block, so only their share is counted.

A product whose FLOPs are c gradients' can only run faster than c
gradients if it reaches a higher FLOP rate than the gradient does, for
example through larger matrix products when probes are batched.

Usage::

    python benchmarks/flop_count.py [--workloads mlp,cnn,transformer,resnet18] [--block 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import paths
import workloads


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_workload(name: str, block: int, seed: int) -> dict:
    workload = workloads.build(name, seed=seed)
    Z = next(paths.probe_blocks(workload, block, seed, block))
    gradient = count(lambda: paths.gradients(workload, 1, seed, None))

    graph = {}

    def build_graph():
        graph["params"], graph["grads"] = paths._cached_gradient(workload)

    graph_build = count(build_graph)
    tangent = [t[0] for t in paths.split_rows(workload, Z[:1]).values()]
    reverse = count(lambda: torch.autograd.grad(graph["grads"], graph["params"], tangent, retain_graph=True))
    forward = count(lambda: paths.jvp_loop(workload)(Z[:1]))
    vmapped = count(lambda: paths.vmap_jvp(workload)(Z)) / block
    return {
        "workload": name,
        "description": workloads.DESCRIPTIONS[name],
        "num_params": workload.num_params,
        "gradient_flops": gradient,
        "in_gradients": {
            "gradient with create_graph=True (once per trace)": graph_build / gradient,
            "reverse-over-reverse product, kept graph": reverse / gradient,
            "jvp(grad) product": forward / gradient,
            f"vmap(jvp(grad)) product, per probe of a block of {block}": vmapped / gradient,
        },
    }


def to_markdown(payload: dict) -> str:
    results = payload["results"]
    names = [r["workload"] for r in results]
    rows = [["one gradient (GFLOP)"] + [f"{r['gradient_flops'] / 1e9:.4g}" for r in results]]
    for key in results[0]["in_gradients"]:
        rows.append([key] + [f"{r['in_gradients'][key]:.2f}" for r in results])
    return "\n".join([
        f"Machine: {common.describe_machine(payload['environment'])}.",
        "",
        "Matrix-multiply and convolution FLOPs of one product, in gradients "
        "(torch.utils.flop_counter; elementwise operations not counted):",
        "",
        common.markdown_table(["quantity"] + names, rows),
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOAD_NAMES),
                        type=lambda s: [w.strip() for w in s.split(",") if w.strip()])
    parser.add_argument("--block", type=int, default=10, help="probes per vmap block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=common.BENCH_DIR / "results")
    args = parser.parse_args(argv)

    payload = {
        "environment": common.environment("cpu", None),
        "args": {"workloads": args.workloads, "block": args.block, "seed": args.seed},
        "results": [count_workload(name, args.block, args.seed) for name in args.workloads],
    }
    common.write_json(args.out / "flops.json", payload)
    markdown = to_markdown(payload)
    (args.out / "flops.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
