"""Fit and split on a mesh, from ahead-of-time compilation on simulated CPU devices (no weights).

    python benchmarks/scaling.py [--only flops,memory,compile] [--out /tmp/scaling.json] [--markdown]

Every program is the project's own (tools/phase_programs.py: the SFT step, the GRPO update, the
rollout's generate call and prefill, the log-prob forwards), lowered on `jax.ShapeDtypeStruct`
parameters with the trainers' shardings and compiled; nothing is allocated or run.

  flops    per-device FLOPs (`compiled.cost_analysis()`) of the SFT step, the GRPO update and the
           rollout prefill of a Qwen2.5-VL-3B-widths shallow model (2 decoder layers, 2 vision blocks,
           block 1 full attention, vocabulary 151,936) on meshes (1,1,1), (8,1,1), (1,8,1), (2,4,1);
           decoder = the program on text-only rows of the same length, vision = with images - without;
           ratio = per device / (one device / 8) (target <= 1.15). XLA's cost analysis counts a loop
           body once: with scanned layers and blocks the figures are one layer / block plus what runs
           outside the loops, the same on every mesh. Collective bytes: the result shapes of every
           all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute of the program
           (a collective inside a loop counted once).
  memory   XLA's per-device peak (arguments + outputs + temporaries - aliased) of every phase of the 3B
           and 7B GRPO recipes (configs/grpo.py, full depth) on 8 and 16 devices (mesh (1, n, 1), the
           presets' (1, -1, 1)); 16 devices run in a child process. The default config and
           tools/plan_memory.py's suggestion for 32 GiB per device; next to each, the planner's estimate
           and estimate / XLA. "total" adds the resident state the phase program does not take (the
           optimiser state during the rollout, the reference copy during the update, ...).
  compile  lowering and compile seconds and StableHLO characters (`len(lowered.as_text())`) of the
           full-depth 3B SFT step and GRPO update (recipe shapes, mesh --compile_mesh) vs 2 decoder
           layers and 2 vision blocks, each case in its own process (XLA's caches would favour a second).

Full depth is slow on a small CPU (a minute or more per program): every finished case is written to
`--out` at once and skipped when the script runs again with the same file, so an interrupted run
resumes. Progress goes to stderr; the JSON result (all cases in `--out`) to stdout, and with
`--markdown` a results section (the tables of benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Callable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from tools import phase_programs as pp  # noqa: E402
from tools import plan_memory  # noqa: E402
from vlaa_jax import sharding as shd  # noqa: E402

GiB = 2 ** 30
FLOP_MESHES: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1))
FLOP_PROGRAMS = ("sft", "update", "prefill")
FLOP_TARGET = 1.15
# FLOPs workload: one micro-batch of 8 rows (one per device on 8 devices), a 448x448 image per row.
FLOP_GRPO = ("grpo.py:vlaa_thinker_3b", ["data.max_prompt_length=512", "grpo.max_new_tokens=256",
                                         "grpo.rollout_micro_batch=8", "train.batch_size=8",
                                         "train.grad_accum_steps=1"])
FLOP_SFT = ("sft.py:vlaa_thinker_3b", ["data.max_length=1024", "train.batch_size=8", "train.grad_accum_steps=1"])
MEMORY_PRESETS = ("vlaa_thinker_3b", "vlaa_thinker_7b")
MEMORY_DEVICES = (8, 16)
SUGGEST_FOR = 32 * GiB
MEMORY_TARGETS = {"default": 60 * GiB, "suggested_32GiB": 30 * GiB}


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- set-up
def trainer_config(spec: str, sets: list[str]) -> Any:
    c = plan_memory.load_trainer_config(os.path.join(ROOT, "configs", spec))
    plan_memory.apply_overrides(c, sets)
    return c


def shallow(model: Any, layers: int = 2, vision_blocks: int = 2) -> Any:
    """`model` with `layers` decoder layers and `vision_blocks` vision blocks, the last of them full
    attention."""
    return model.replace(text=dataclasses.replace(model.text, num_hidden_layers=layers),
                         vision=dataclasses.replace(model.vision, depth=vision_blocks,
                                                    fullatt_block_indexes=(vision_blocks - 1,)))


def workload(spec: str, sets: list[str], *, layers: int | None = None, vision_blocks: int | None = None) -> Any:
    c = trainer_config(spec, sets)
    model = plan_memory.model_from_trainer_config(c)
    if layers is not None:
        model = shallow(model, layers, vision_blocks or layers)
    return pp.Workload.from_config(c, model)


def mesh_of(shape: tuple[int, ...]):
    n = math.prod(shape)
    if jax.device_count() < n:
        raise RuntimeError(f"mesh {shape} needs {n} devices; this process has {jax.device_count()}")
    return shd.make_mesh(shape, devices=jax.devices()[:n])


class Results:
    """The JSON results file: one entry per finished case, written after each (so a run resumes)."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict[str, dict[str, Any]] = {}
        if path and os.path.isfile(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, part: str, key: str) -> Any:
        return self.data.get(part, {}).get(key)

    def put(self, part: str, key: str | None, value: Any) -> None:
        """Stores `value` under (part, key), or as the whole `part` where key is None; writes the file."""
        if key is None:
            self.data[part] = value
        else:
            self.data.setdefault(part, {})[key] = value
        if self.path:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.path)

    def case(self, part: str, key: str, fn: Callable[[], Any]) -> Any:
        """The stored result of (part, key), or fn()'s, stored."""
        hit = self.get(part, key)
        if hit is not None:
            log(f"[{part}] {key}: done before")
            return hit
        t0 = time.perf_counter()
        value = fn()
        log(f"[{part}] {key}: {time.perf_counter() - t0:.0f} s")
        self.put(part, key, value)
        return value


# --------------------------------------------------------------------------------------------- FLOPs
def program_flops(w: Any, mesh_shape: tuple[int, ...], program: str, *, images: bool) -> dict[str, Any]:
    """Per-device FLOPs and collectives of one program on one mesh."""
    programs = pp.PhasePrograms(w, mesh_of(mesh_shape))
    t0 = time.perf_counter()
    compiled = programs.lower(program, images=images).compile()
    return {"flops": pp.flops(compiled), "collectives": pp.collective_bytes(compiled.as_text()),
            "compile_s": round(time.perf_counter() - t0, 1)}


def flops_workloads(model: Any | None = None) -> dict[str, Any]:
    """The workload of each FLOPs program (default model: 3B widths, 2 + 2 blocks, real vocabulary)."""
    out = {}
    for program in FLOP_PROGRAMS:
        spec, sets = FLOP_SFT if program == "sft" else FLOP_GRPO
        c = trainer_config(spec, sets)
        m = model if model is not None else shallow(plan_memory.model_from_trainer_config(c))
        out[program] = pp.Workload.from_config(c, m)
    return out


def measure_flops(results: Results, *, model: Any | None = None, programs=FLOP_PROGRAMS,
                  meshes=FLOP_MESHES) -> dict[str, Any]:
    """Per program and mesh: decoder and vision FLOPs per device, their ratio to one device's / n, and
    the collective bytes of the program with images."""
    workloads = flops_workloads(model)
    summary: dict[str, Any] = {}
    for program in programs:
        rows = {}
        for mesh in meshes:
            key = lambda images: f"{program}|{','.join(map(str, mesh))}|{'images' if images else 'text'}"  # noqa: E731
            with_images = results.case("flops", key(True), lambda: program_flops(workloads[program], mesh, program,
                                                                                images=True))
            text = results.case("flops", key(False), lambda: program_flops(workloads[program], mesh, program,
                                                                          images=False))
            rows[mesh] = {"decoder": text["flops"], "vision": with_images["flops"] - text["flops"],
                          "collectives": with_images["collectives"]}
        single = rows.get((1, 1, 1))
        for mesh, r in rows.items():
            n = math.prod(mesh)
            if single and n > 1:
                for part in ("decoder", "vision"):
                    r[f"{part}_ratio"] = r[part] / (single[part] / n) if single[part] else None
            r["collective_bytes"] = sum(c["bytes"] for c in r["collectives"].values())
        summary[program] = {",".join(map(str, m)): r for m, r in rows.items()}
    return summary


# -------------------------------------------------------------------------------------------- memory
def memory_sets(preset: str, devices: int, variant: str) -> dict[str, Any]:
    """The config overrides of a memory case: none, or the planner's suggestion for 32 GiB per device
    (values None where nothing fits)."""
    if variant != "suggested_32GiB":
        return {}
    sug = plan_memory.suggest(workload(f"grpo.py:{preset}", []), (1, devices, 1), SUGGEST_FOR)
    return {k: v for k, v in sug.items() if k.startswith(("train.", "grpo."))}


def memory_case(preset: str, devices: int, variant: str) -> dict[str, Any]:
    """XLA's figures of every phase of a GRPO recipe on (1, devices, 1) (the expensive part)."""
    sets = memory_sets(preset, devices, variant)
    if any(v is None for v in sets.values()):
        return {"sets": sets, "error": f"the planner finds no setting that fits {SUGGEST_FOR / GiB:g} GiB"}
    w = workload(f"grpo.py:{preset}", [f"{k}={v}" for k, v in sets.items()])
    return {"sets": sets, "mesh": [1, devices, 1], "xla": plan_memory.xla_phase_figures(w, (1, devices, 1))}


def memory_summary(cases: dict[str, Any]) -> dict[str, Any]:
    """Per case and phase: XLA's program peak and total, the planner's estimate (recomputed: cheap) and
    estimate / XLA, and the largest total against the target."""
    out = {}
    for key, case in cases.items():
        preset, n, variant = key.split("|")
        if "error" in case:
            out[key] = case
            continue
        w = workload(f"grpo.py:{preset}", [f"{k}={v}" for k, v in case["sets"].items()])
        plan = plan_memory.plan_phases(w, tuple(case["mesh"]))
        phases = {}
        for phase, x in case["xla"].items():
            e = plan["phases"][phase]
            phases[phase] = {"xla_peak": x["peak"], "xla_total": x["total"], "compile_s": x["compile_s"],
                             "estimate_peak": e["peak"], "estimate_total": e["total"],
                             "estimate_over_xla": e["peak"] / x["peak"], "estimate_stage": e["peak_stage"]}
        total = max(p["xla_total"] for p in phases.values())
        out[key] = {"sets": case["sets"], "workload": plan["workload"], "phases": phases, "max_total": total,
                    "target": MEMORY_TARGETS[variant], "met": total <= MEMORY_TARGETS[variant]}
    return out


def measure_memory(results: Results, devices: int | None, out_path: str | None) -> dict[str, Any]:
    """Every (preset, device count, variant); device counts other than this process's run in a child."""
    counts = (devices,) if devices else MEMORY_DEVICES
    for n in counts:
        keys = [f"{p}|{n}|{v}" for p in MEMORY_PRESETS for v in MEMORY_TARGETS]
        if all(results.get("memory", k) for k in keys):
            continue
        if n == jax.device_count():
            for key in keys:
                preset, _, variant = key.split("|")
                results.case("memory", key, lambda: memory_case(preset, n, variant))
        else:
            child_out = f"{out_path or '/tmp/scaling'}.{n}dev.json"
            log(f"[memory] {n} devices: child process (its progress in {child_out})")
            pp.run_on_devices(n, [os.path.abspath(__file__), "--only", "memory", "--devices", str(n),
                                  "--out", child_out], capture_stderr=False)
            with open(child_out) as f:
                for key, value in json.load(f).get("memory", {}).items():
                    results.put("memory", key, value)
    return results.data.get("memory", {})


# ------------------------------------------------------------------------------------------- compile
def compile_case(step: str, layers: int | None, mesh_shape: tuple[int, ...]) -> dict[str, Any]:
    """Lowering / compile seconds and StableHLO size of the recipe's SFT step or GRPO update."""
    spec = "sft.py:vlaa_thinker_3b" if step == "sft" else "grpo.py:vlaa_thinker_3b"
    w = workload(spec, [], layers=layers, vision_blocks=layers)
    programs = pp.PhasePrograms(w, mesh_of(mesh_shape))
    t0 = time.perf_counter()
    lowered = programs.lower("sft" if step == "sft" else "update")
    t1 = time.perf_counter()
    chars = len(lowered.as_text())
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"step": step, "decoder_layers": w.model.text.num_hidden_layers, "vision_blocks": w.model.vision.depth,
            "mesh": list(mesh_shape), "lower_s": round(t1 - t0, 1), "compile_s": round(t3 - t2, 1),
            "hlo_chars": chars}


def measure_compile(results: Results, mesh_shape: tuple[int, ...]) -> dict[str, Any]:
    n = math.prod(mesh_shape)
    for step in ("sft", "grpo"):
        for layers in (None, 2):
            key = f"{step}|{'full' if layers is None else layers}|{','.join(map(str, mesh_shape))}"
            argv = [os.path.abspath(__file__), "--only", "compile_one", "--step", step,
                    "--compile_mesh", ",".join(map(str, mesh_shape))] + ([] if layers is None else ["--layers", str(layers)])
            results.case("compile", key, lambda: json.loads(pp.run_on_devices(n, argv).strip().splitlines()[-1]))
    return results.data.get("compile", {})


# ------------------------------------------------------------------------------------------ markdown
def _g(x: float) -> str:
    return f"{x / GiB:.2f}"


def markdown(data: dict[str, Any]) -> str:
    """The results as markdown tables (benchmarks/RESULTS.md)."""
    lines: list[str] = []
    flops = data.get("flops_summary", {})
    if flops:
        lines += ["Per-device FLOPs / (one device's / 8), decoder and vision tower separately (target <= "
                  f"{FLOP_TARGET}), and the bytes of all collectives in the program:", "",
                  "| program | mesh | decoder GFLOP/device | ratio | vision GFLOP/device | ratio | collectives MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for program, rows in flops.items():
            for mesh, r in rows.items():
                ratio = lambda k: "" if r.get(k) is None else f"{r[k]:.3f}"  # noqa: E731
                lines.append(f"| {program} | ({mesh}) | {r['decoder'] / 1e9:.1f} | {ratio('decoder_ratio')} | "
                             f"{r['vision'] / 1e9:.1f} | {ratio('vision_ratio')} | {r['collective_bytes'] / 2 ** 20:.0f} |")
        lines.append("")
    memory = data.get("memory_summary", {})
    if memory:
        lines += ["XLA's peak per device (program: arguments + temporaries; total: + the resident state beside "
                  "it), GiB, and the planner's estimate of the program / XLA's:", "",
                  "| recipe | devices | variant | settings | rollout | logprobs | ref_logprobs | update | max total | "
                  "target | met |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key, case in sorted(memory.items()):
            preset, n, variant = key.split("|")
            sets = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in case.get("sets", {}).items()) or "preset"
            if "error" in case:
                lines.append(f"| {preset} | {n} | {variant} | {sets} | {case['error']} | | | | | | |")
                continue
            cells = []
            for phase in ("rollout", "logprobs", "ref_logprobs", "update"):
                p = case["phases"].get(phase)
                cells.append("-" if p is None else
                             f"{_g(p['xla_peak'])} / {_g(p['xla_total'])} (est {p['estimate_over_xla']:.2f})")
            lines.append(f"| {preset} | {n} | {variant} | {sets} | {' | '.join(cells)} | {_g(case['max_total'])} | "
                         f"<= {case['target'] / GiB:g} | {'yes' if case['met'] else 'no'} |")
        lines.append("")
    comp = data.get("compile", {})
    if comp:
        lines += ["| step | decoder layers | vision blocks | mesh | lower s | compile s | StableHLO chars |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for _, r in sorted(comp.items()):
            lines.append(f"| {r['step']} | {r['decoder_layers']} | {r['vision_blocks']} | ({','.join(map(str, r['mesh']))}) "
                         f"| {r['lower_s']} | {r['compile_s']} | {r['hlo_chars']:,} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="flops,memory,compile", help="comma-separated: flops, memory, compile")
    ap.add_argument("--out", default=None, help="results JSON; finished cases in it are not run again")
    ap.add_argument("--markdown", action="store_true", help="also print the results as markdown tables")
    ap.add_argument("--devices", type=int, default=None, help="memory: only the cases on this many devices")
    ap.add_argument("--compile_mesh", default="1,8,1", help="compile: the mesh of the compile-time cases")
    ap.add_argument("--step", choices=("sft", "grpo"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    compile_mesh = tuple(int(x) for x in a.compile_mesh.split(","))
    if parts == ["compile_one"]:          # a child of `compile`: one case, its JSON on stdout
        print(json.dumps(compile_case(a.step, a.layers, compile_mesh)))
        return 0
    unknown = set(parts) - {"flops", "memory", "compile"}
    if unknown:
        raise SystemExit(f"--only: unknown parts {sorted(unknown)}; choose from flops, memory, compile")
    results = Results(a.out)
    if "flops" in parts:
        results.put("flops_summary", None, measure_flops(results))
        results.put("meta", "flops_model", "Qwen2.5-VL-3B widths, 2 decoder layers, 2 vision blocks (1 full)")
    if "memory" in parts:
        measure_memory(results, a.devices, a.out)
        if not a.devices:
            results.put("memory_summary", None, memory_summary(results.data.get("memory", {})))
    if "compile" in parts:
        measure_compile(results, compile_mesh)
    results.put("meta", "date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    results.put("meta", "jax", jax.__version__)
    print(json.dumps(results.data, indent=1, default=str))
    if a.markdown:
        print(markdown(results.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
