"""Autotune configs of the Triton attention kernels, and the pruner that keeps, for each launch,
only those that fit the device and the variant.

A config is (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages). Which of them can run
depends on the launch: the head dim and the dots' input type set the tiles' shared memory and
registers, and masks and dropout add registers. Neither is estimated here: `make gpu-ready`
(fastdl.gpu_ready) compiles every config ahead of time for sm_80 and sm_90 and writes what ptxas
and Triton report into attention_resources.json beside this file; `Prune` keeps the configs whose
measured shared memory fits the device's opt-in limit and whose spills are within `spill_limit`.
The gate then checks, on every run, that what the pruner keeps still compiles within those limits.
"""
import functools
import json
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(gpu, interpreter):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages): the GPU list, or under the
    interpreter one small config (BLOCK_M != BLOCK_N, so the block-bound arithmetic is exercised)."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in (interpreter if INTERPRET else gpu)]


# Tensor-core configs (fp16, bf16, tf32), large to small; 8-warp ones for the variants whose
# masks and dropout take registers; 32x32 with 8 warps and (dq) 16x32 for tf32 at head dim 256,
# where 32x32 with 4 warps spills 2-5 KB per thread. fp32 with IEEE dots runs on CUDA cores, with
# its operand tiles in registers too: only small tiles fit, and only those are its candidates
# (larger ones spill 100+ KB per thread, and ptxas takes minutes on each).
_TENSOR_CORE = {
    "_forward_kernel": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2),
                        (64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 4, 1), (32, 32, 4, 1)],
    "_dq_kernel": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2),
                   (64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 8, 1), (16, 32, 4, 1)],
    "_dkdv_kernel": [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2),
                     (32, 32, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1)],
}
_FMA = [(32, 32, 4, 1), (32, 32, 8, 1), (16, 32, 4, 1), (16, 16, 4, 1)]
_INTERPRETER = {"_forward_kernel": [(16, 32, 4, 1)], "_dq_kernel": [(16, 32, 4, 1)], "_dkdv_kernel": [(32, 16, 4, 1)]}


def _all(kernel):
    return _configs(_TENSOR_CORE[kernel] + [c for c in _FMA if c not in _TENSOR_CORE[kernel]], _INTERPRETER[kernel])


FORWARD, DQ, DKDV = _all("_forward_kernel"), _all("_dq_kernel"), _all("_dkdv_kernel")
DELTA_BLOCK_M = 16 if INTERPRET else 64

# Every constexpr but the tuned block sizes: each variant (masks, padding, lengths, causal, dropout,
# dot precision) is its own code, with its own registers, so a config tuned on one is never reused
# for another. The sequence lengths enter as their powers of two (L_BUCKET, S_BUCKET, read by no
# kernel): a config tuned at L = 128 is not reused at L = 8192, nor is every length tuned anew.
KEY = ["HEAD_DIM", "BLOCK_D", "HAS_MASK", "HAS_KPM", "HAS_LENGTHS", "IS_CAUSAL", "DROPOUT", "PREC",
       "L_BUCKET", "S_BUCKET"]

RESOURCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_resources.json")
# Spill bytes per thread (stores + loads) a config may have to be kept: none for fp16 / bf16 at head
# dims up to 128 (each variant has a spill-free config there); elsewhere (fp32, and head dim 256,
# where no config of an fp16 dq is spill-free) up to 2 KiB, which a block of 4 warps keeps in L1.
SPILL_FREE, SPILL_HEAVY = 0, 2048


def spill_limit(element_size, block_d):
    return SPILL_FREE if element_size == 2 and block_d <= 128 else SPILL_HEAVY


def config_name(cfg):
    """ "BLOCK_Mx BLOCK_N wW sS", the key of a config in the resource table."""
    if isinstance(cfg, triton.Config):
        cfg = dict(cfg.all_kwargs())
    blocks = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N") if k in cfg)
    warps, stages = cfg.get("num_warps", 4), cfg.get("num_stages", 3)
    return f"{blocks or '-'} w{warps} s{stages}"


def table_key(kernel, element_size, prec, block_d, heavy):
    """The resource table's key of a launch: the kernel, the dots' input ("16": fp16 / bf16, "tf32",
    "ieee": fp32), BLOCK_D, and the variant's class ("heavy": attn_mask, key padding or dropout,
    measured with all of them at once; "light": the rest, measured plain and causal)."""
    dots = "16" if element_size == 2 else prec
    return f"{kernel}/{dots}/{block_d}/{'heavy' if heavy else 'light'}"


@functools.lru_cache(maxsize=None)
def load_table(path=RESOURCES):
    """{table_key: {config_name: {"sm_80" | "sm_90": [shared bytes, spill bytes]}}}, {} if absent."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _device(index):
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.shared_memory_per_block_optin


def candidates(kernel, configs, element_size, prec):
    """The configs of `kernel` made for the launch's dots: the FMA ones for fp32 with IEEE dots,
    else the tensor-core ones."""
    fma = element_size == 4 and prec == "ieee"
    want = {config_name(dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st))
            for m, n, w, st in (_FMA if fma else _TENSOR_CORE[kernel])}
    return [c for c in configs if config_name(c) in want]


class Prune:
    """early_config_prune for one kernel ("_forward_kernel", "_dq_kernel", "_dkdv_kernel")."""

    def __init__(self, kernel, table=load_table):
        """table: a callable returning the resource table (the committed one by default)."""
        self.kernel, self.table = kernel, table

    def __call__(self, configs, nargs, **kwargs):
        if INTERPRET:
            return configs
        dev = nargs["Q"].device
        arch, shared = _device(dev.index if dev.index is not None else torch.cuda.current_device())
        return self.for_device(arch, shared, configs, nargs, **kwargs)

    def for_device(self, arch, shared_limit, configs, nargs, **kwargs):
        """The configs kept on a device of compute capability `arch` (80, 90, ...) with
        `shared_limit` bytes of shared memory per block: those measured within both limits (for
        the smallest measured BLOCK_D at least the launch's, on sm_90 for arch >= 90, else sm_80)
        among the `candidates` for its dots;
        where none is, the measured one within the shared limit that spills least; where none fits,
        the one with the least shared memory. A config the table lacks is never kept."""
        es, block_d = nargs["Q"].element_size(), kwargs["BLOCK_D"]
        heavy = bool(kwargs["HAS_MASK"] or kwargs["HAS_KPM"] or kwargs["DROPOUT"])
        table, target = self.table(), "sm_90" if arch >= 90 else "sm_80"
        keys = [table_key(self.kernel, es, kwargs["PREC"], d, heavy) for d in (16, 32, 64, 128, 256) if d >= block_d]
        keys = [k for k in keys if k in table]
        if not keys:
            raise NotImplementedError(f"{self.kernel}: no measured config for BLOCK_D={block_d} in {RESOURCES} "
                                      "(make gpu-ready writes it)")
        entry = table[keys[0]]
        measured = [(c, entry[config_name(c)][target]) for c in candidates(self.kernel, configs, es, kwargs["PREC"])
                    if target in entry.get(config_name(c), {})]
        fits = [(c, m) for c, m in measured if m[0] <= shared_limit]
        kept = [c for c, m in fits if m[1] <= spill_limit(es, block_d)]
        if kept:
            return kept
        if fits:
            return [min(fits, key=lambda cm: cm[1][1])[0]]
        return [min(measured or [(c, [0, 0]) for c in configs], key=lambda cm: cm[1][0])[0]]
