"""Two builds of fastdl side by side in one session: the portable-CPU targets (fastdl/bench/isa.py's
cases) through the public API only, so that a build from before an API change still runs them.

Each build is a checkout with fastdl/_C built in place (`python setup.py build_ext --inplace`);
its process gets that checkout on PYTHONPATH. The builds alternate, `--rounds` times each. Rows:
the median over the rounds of each build's fastdl time and of torch's time measured in the same
process.

    python benchmarks/compare_builds.py --build before=/tmp/base --build after=. --out PATH.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from fastdl.bench import harness

CASES = r'''
import json, statistics, time, torch, torch.nn as nn, torch.nn.functional as tF
import fastdl, fastdl.functional as F

def med(fn, budget=1.5):
    fn(), fn()
    ts, end = [], time.perf_counter() + budget
    while len(ts) < 5 or time.perf_counter() < end:
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

def train(f, inputs):
    g = torch.randn_like(f())
    return lambda: torch.autograd.grad(f(), inputs, g)

torch.manual_seed(0)
rows = {}
for N, L in ((4, 1024), (2, 2048)):
    q, k, v = (torch.randn(N, 8, L, 64, requires_grad=True) for _ in range(3))
    rows[f"sdpa-N{N}-H8-L{L}-D64-fwd+bwd"] = (
        train(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), [q, k, v]),
        train(lambda q=q, k=k, v=v: tF.scaled_dot_product_attention(q, k, v), [q, k, v]))
x = torch.randn(2, 1024, 512, requires_grad=True)
mha = nn.MultiheadAttention(512, 8, batch_first=True)
fa = fastdl.FusedAttention.from_module(mha)
causal = dict(attn_mask=torch.ones(1024, 1024, dtype=torch.bool).triu(1), is_causal=True, need_weights=False)
rows["mha-N2-L1024-E512-H8-fwd+bwd"] = (train(lambda: fa(x, x, x)[0], [x, *fa.parameters()]),
                                        train(lambda: mha(x, x, x)[0], [x, *mha.parameters()]))
rows["mha-N2-L1024-E512-H8-causal-noweights-fwd+bwd"] = (
    train(lambda: fa(x, x, x, **causal)[0], [x, *fa.parameters()]),
    train(lambda: mha(x, x, x, **causal)[0], [x, *mha.parameters()]))
for K in (3, 7):
    conv = nn.Conv2d(128, 128, K, 1, K // 2, groups=128).to(memory_format=torch.channels_last)
    dw = fastdl.DepthwiseConv2d(128, 128, K, 1, K // 2)
    dw.load_state_dict(conv.state_dict())
    dw = dw.to(memory_format=torch.channels_last)
    xi = torch.randn(32, 128, 56, 56).to(memory_format=torch.channels_last).requires_grad_()
    rows[f"dw-N32-C128-H56-k{K}-s1-fwd+bwd"] = (train(lambda dw=dw, xi=xi: dw(xi), [xi, *dw.parameters()]),
                                               train(lambda conv=conv, xi=xi: conv(xi), [xi, *conv.parameters()]))

class Tail(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(64)
    def forward(self, x, r):
        out = self.bn(x)
        out += r
        return torch.relu_(out)

tail = Tail()
fused = fastdl.FusedBatchNorm2d.from_module(tail.bn, activation="relu")
xb, rb = (torch.randn(32, 64, 56, 56, requires_grad=True) for _ in range(2))
rows["bn-N32-C64-H56-W56-train-fwd+bwd"] = (train(lambda: fused(xb, rb), [xb, rb, *fused.parameters()]),
                                             train(lambda: tail(xb, rb), [xb, rb, *tail.parameters()]))
out = {name: [med(a), med(b)] for name, (a, b) in rows.items()}
tail.eval(), fused.eval()
with torch.no_grad():
    out["bn-N32-C64-H56-W56-eval-fwd"] = [med(lambda: fused(xb, rb)), med(lambda: tail(xb, rb))]
print(json.dumps(out))
'''


def run(path):
    env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
    r = subprocess.run([sys.executable, "-c", CASES], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{path}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def commit_of(path):
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="append", required=True, help="NAME=PATH of a checkout built in place")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    builds = dict(b.split("=", 1) for b in args.build)
    times = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, path in builds.items():
            times[name].append(run(path))
    rows = []
    for case in times[next(iter(builds))][0]:
        row = {"name": case}
        for name in builds:
            fast = statistics.median(t[case][0] for t in times[name])
            eager = statistics.median(t[case][1] for t in times[name])
            row[name] = dict(fastdl_s=fast, eager_s=eager, eager_over_fastdl=eager / fast)
        rows.append(row)
    out = dict(harness.conditions(torch.device("cpu"), "median of wall-clock calls (5 or more, for 1.5 s)"),
               builds={name: dict(path=str(path), commit=commit_of(path)) for name, path in builds.items()},
               rounds=args.rounds, cases=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for row in rows:
        print(f"{row['name']:<48}" + "  ".join(f"{n} {row[n]['eager_over_fastdl']:.2f}x ({row[n]['fastdl_s'] * 1e3:.1f} ms)"
                                             for n in builds))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
