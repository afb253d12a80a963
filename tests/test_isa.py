"""The CPU kernels' run-time instruction sets (csrc/cpu/isa.h): every set this machine can run gives the reference's
values, ATEN_CPU_CAPABILITY caps our choice as it caps torch's, and the built library keeps AVX instructions inside
the isa_avx2 / isa_avx512 namespaces (an AVX copy of a shared symbol would crash a CPU without AVX)."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepfusion_ref import ops

needs_op = pytest.mark.skipif(not (ops.load_extension() and hasattr(torch.ops.deepfusion_ref, "cpu_isa")),
                              reason="compiled extension with cpu_isa not built")
ORDER = ["base", "avx2", "avx512"]

# In a fresh process (the choice is read once): the chosen set, then the kernels' largest errors against the
# references of both ops, forward and backward, in both layouts.
CHILD = r"""
import json, torch
from deepfusion_ref import ops
torch.manual_seed(0)
err = {}
for layout in ("contiguous", "channels_last"):
    x = (torch.randn(2, 64, 9, 11, dtype=torch.float64) * 3 + 1).float()
    x = x.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    w, b = torch.randn(64), torch.randn(64)
    s, t = torch.randn(2, 64), torch.randn(2, 64)
    leaves = [x, w, b, s, t]
    for v in leaves:
        v.requires_grad_()
    out = {impl: ops.group_norm_silu(x, w, b, 8, s, t, impl=impl) for impl in ("extension", "reference")}
    g = torch.randn_like(out["reference"])
    grads = {k: torch.autograd.grad(v, leaves, g) for k, v in out.items()}
    err["gn_" + layout] = (out["extension"] - out["reference"]).abs().max().item()
    err["gn_grad_" + layout] = max((a - r).abs().max().item() / max(1.0, r.abs().max().item())
                                   for a, r in zip(grads["extension"], grads["reference"]))
x = torch.randn(2, 37, 96, requires_grad=True)
shift, scale = torch.randn(2, 96, requires_grad=True), torch.randn(2, 96, requires_grad=True)
out = {impl: ops.adaln_norm(x, shift, scale, impl=impl) for impl in ("extension", "reference")}
g = torch.randn_like(out["reference"])
grads = {k: torch.autograd.grad(v, (x, shift, scale), g) for k, v in out.items()}
err["adaln"] = (out["extension"] - out["reference"]).abs().max().item()
err["adaln_grad"] = max((a - r).abs().max().item() / max(1.0, r.abs().max().item())
                        for a, r in zip(grads["extension"], grads["reference"]))
print(json.dumps({"isa": torch.ops.deepfusion_ref.cpu_isa(), "err": err}))
"""


def run_child(capability=None):
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_op
def test_detected_isa_matches_the_cpu():
    isa = torch.ops.deepfusion_ref.cpu_isa()
    assert isa in ORDER
    if platform.machine() == "x86_64" and os.environ.get("ATEN_CPU_CAPABILITY") is None and Path("/proc/cpuinfo").exists():
        flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]))
        can = "base"
        if {"avx2", "fma", "f16c"} <= flags:
            can = "avx2"
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
                can = "avx512"
        assert isa == can


@needs_op
@pytest.mark.parametrize("capability", ["default", "avx2", None])
def test_every_instruction_set_matches_the_reference(capability):
    best = torch.ops.deepfusion_ref.cpu_isa()
    got = run_child(capability)
    want = {"default": "base", "avx2": "avx2", None: best}[capability]
    if ORDER.index(want) > ORDER.index(best):
        want = best  # the cap never raises the choice above what the CPU has
    assert got["isa"] == want
    for name, e in got["err"].items():
        assert e < 1e-4, (got["isa"], name, e)


@needs_op
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="x86-64 objdump")
def test_avx_instructions_only_inside_the_isa_namespaces():
    so = next(Path(ops.__file__).parent.glob("_C*.so"))
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(so)], capture_output=True,
                             text=True, check=True).stdout
    function, outside, inside = None, set(), 0
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            function = head.group(1)
            continue
        insn = re.match(r"^\s*[0-9a-f]+:\s+(\S+)\s*([^<#]*)", line)
        if function is None or insn is None:
            continue
        if insn.group(1).startswith("v") or re.search(r"%[yz]mm", insn.group(2)):
            if "isa_avx2::" in function or "isa_avx512::" in function:
                inside += 1
            else:
                outside.add(function)
    assert not outside, sorted(outside)[:5]
    if re.search(r"isa_avx512::", listing):
        assert inside > 0  # the wide copies exist and use wide instructions
