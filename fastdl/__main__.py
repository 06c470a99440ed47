"""The fastdl command line: `fastdl info`, `fastdl check`, `fastdl train`, `fastdl bench` (also
`python -m fastdl ...`)."""
import argparse
import json
import subprocess
import sys

import torch


def _table(headers, rows):
    widths = [max(len(str(v)) for v in col) for col in zip(headers, *rows)]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths)] + [line(r) for r in rows])


def cmd_info(args):
    import fastdl

    info = fastdl.info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    v, ext = info["versions"], info["extension"]
    print(f"fastdl {v['fastdl']}  torch {v['torch']}  triton {v['triton'] or '-'}  CUDA {v['cuda'] or '-'}  "
          f"python {v['python']}")
    print(f"devices: {', '.join(info['devices'])}  ({info['threads']} CPU threads)")
    if ext["loaded"]:
        b = ext["build"]
        cuda = "no CUDA objects" if b.get("cuda") == "none" else f"CUDA {b['cuda']} objects for sm {b['cuda_archs']}"
        print(f"extension: fastdl._C loaded: C++ kernels (OpenMP {b['openmp']}), {cuda}")
        c = info["cpu"]
        print(f"cpu: {c['model']}: supports up to {c['supported']} ({', '.join(c['features']) or 'no vector extensions'})")
        print(f"C++ kernels: {c['active']} copy ({c['reason']}); built: {', '.join(c['compiled'])}")
    else:
        print(f"extension: not loaded ({ext['error']})")
    if info["triton_error"]:
        print(f"triton: {info['triton_error']}")
    d = info["distributed"]
    backends = [name for name in ("gloo", "nccl") if d[name]]
    print(f"torch.distributed: {', '.join(backends) + ' (fastdl train --nproc, synchronized batch norm)' if backends else 'not available'}")
    print()
    print(_table(("op", "device", "dtype", "backend", "why"),
                 [(r["op"], r["device"], r["dtype"], r["backend"], r["reason"]) for r in info["ops"]]))
    return 0


def cmd_check(args):
    from fastdl import check

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastdl check: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    rows = check.run(device)
    print(_table(("op", "case", "backend", "output", "result", "detail"),
                 [(op, case, be, out, "PASS" if ok else "FAIL", msg) for op, case, be, out, ok, msg in rows]))
    failed = sum(not r[4] for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_train(args):
    from fastdl import distributed, train

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastdl train: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    args.epochs = train.EPOCHS.get(args.model, 3) if args.epochs is None else args.epochs
    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            print(f"fastdl train: {name}: expected a positive integer, got {value}", file=sys.stderr)
            return 2
    if args.lr is not None and not args.lr > 0:
        print(f"fastdl train: --lr: expected a positive number, got {args.lr}", file=sys.stderr)
        return 2
    if args.data is not None and args.model not in train.IMAGE_MODELS:
        print(f"fastdl train: --data: only the image models read MNIST ({', '.join(train.IMAGE_MODELS)}), "
              f"not {args.model}", file=sys.stderr)
        return 2
    if args.nproc < 1:
        print(f"fastdl train: --nproc: expected a positive integer, got {args.nproc}", file=sys.stderr)
        return 2
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        print(f"fastdl train: --nproc: {args.nproc} processes on cuda, but {torch.cuda.device_count()} GPUs are "
              "visible (one process per GPU)", file=sys.stderr)
        return 2
    if args.batch_size < args.nproc:
        print(f"fastdl train: --batch-size: the global batch ({args.batch_size}) must have a sample for each of "
              f"the {args.nproc} processes", file=sys.stderr)
        return 2
    if args.fsdp and args.nproc == 1 and not distributed.launched():
        print("fastdl train: --fsdp: shards across processes; give --nproc N (N > 1) or launch with torchrun",
              file=sys.stderr)
        return 2
    args.lr = args.lr or train.LEARNING_RATES.get(args.model, 1e-3)
    if args.nproc > 1 and not distributed.launched():
        return subprocess.run(_torchrun(args)).returncode
    train.train(args.model, args)
    return 0


def _torchrun(args):
    """The torchrun command running this `fastdl train` in args.nproc processes on this machine."""
    argv = ["train", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr",
            repr(args.lr), "--device", args.device, "--seed", str(args.seed), "--out", args.out]
    argv += ["--amp"] * args.amp + ["--fsdp"] * args.fsdp + (["--data", args.data] if args.data else [])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", "fastdl", *argv]


def cmd_bench(args):
    from fastdl.bench import run

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastdl bench: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    names = run.names()
    unknown = [name for name in args.only if name not in names]
    if unknown:
        print(f"fastdl bench: --only: unknown name {', '.join(unknown)} (choose from {', '.join(names)})",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    picked, skipped = run.select(args.device, args.quick, dtype, args.only)
    if not picked and skipped:
        print(f"fastdl bench: --dtype {args.dtype}: nothing to measure on {args.device}", *skipped, sep="\n  ",
              file=sys.stderr)
        return 2
    if not picked:
        print(f"fastdl bench: --only {' '.join(args.only)}: no case{' in --quick' * args.quick}", file=sys.stderr)
        return 2
    run.run(picked, skipped, args.device, args.quick, dtype, args.out)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastdl", description="fastdl: fused kernels for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices, and which backend each op uses, and why")
    p.add_argument("--json", action="store_true", help="print fastdl.info() as JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="every op and every model against its PyTorch reference on this machine")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when visible, else cpu")
    p.set_defaults(func=cmd_check)
    from fastdl.train import MODELS

    p = sub.add_parser("train", help="train a model on data that needs no download, evaluate, save, sample")
    p.add_argument("model", choices=MODELS)
    p.add_argument("--epochs", type=int, help="default: 40 for gpt, 30 for lstm and gan, 15 for diffusion, 5 for rnn, "
                                              "transformer and attention, else 3")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="default: 1e-3 (AdamW), 2e-4 for gan (Adam)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="torch.autocast in bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs", help="where the checkpoint and samples go (default: runs)")
    p.add_argument("--data", metavar="PATH", help="a folder with MNIST's four IDX files (image models; "
                                                  "default: scikit-learn's digits)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine, launched with torchrun "
                   "(DDP; gloo on cpu, NCCL on cuda, one GPU each); --batch-size is then the global batch")
    p.add_argument("--fsdp", action="store_true", help="with --nproc: shard the model with FSDP instead of DDP")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("bench", help="ops and models: fastdl against eager PyTorch and torch.compile, "
                                     "with peak memory; a table, and JSON, markdown and a PNG chart in --out")
    p.add_argument("--quick", action="store_true", help="a few cases of every op and model (minutes on a CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when visible, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="of the ops' tensors, and the autocast dtype of the models (default: float32)")
    p.add_argument("--out", default="runs/bench", help="where bench.json, bench.md and bench.png go "
                                                       "(default: runs/bench)")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help="op stems (batch_norm_act, depthwise_conv2d, attention, rnn, models) or model names")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
