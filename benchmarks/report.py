"""``reports/bench/bench.json`` -> ``bench.md``: one Markdown table per section, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.stats import Summary


def _s(raw: dict[str, Any] | None, digits: int = 1, scale: float = 1.0) -> str:
    if not raw or raw.get("median") is None:
        return "-"
    return Summary(raw["median"] * scale, raw["min"] * scale, raw["max"] * scale, raw["n"]).text(digits)


def _kernel(name: str, config: dict[str, Any], ceiling: dict[str, Any]) -> str:
    """A dense kernel's label: torch.mm n^2 or the convolution's shape."""
    if name == "mm":
        return f"torch.mm {config['matmul_size']}^2 (BLAS)"
    shape = ceiling["conv_shapes"][name]
    return (f"{shape['kernel']}x{shape['kernel']} conv {shape['batch']}x{shape['channels']}x{shape['side']}^2 "
            f"(oneDNN)")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def markdown(bench: dict[str, Any]) -> str:
    m, c = bench["machine"], bench["config"]
    lines = [
        "# transferbench benchmark", "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, timm {m['timm']}, ray {m['ray']}, "
        f"mlflow {m['mlflow']}; {bench['created']}. Mode: {c['mode']}.", "",
        "Every figure: median [min-max] (n). Backbones are random-init (`weights: none`): throughput "
        "does not depend on weight values.", "",
        f"## 1-2. Training throughput: pipeline vs plain timm loop (preset(s) {', '.join(c['presets'])}, "
        f"{c['img_size']} px, batch {c['batch_size']}, {c['threads']} threads, {c['steps']} steps/epoch, "
        f"{c['epochs']} epochs (warm-up not counted), {c['repeats']} A/B pairs)", "",
        f"Dense fp32 kernels, {c['threads']} threads, GFLOP/s: "
        + "; ".join(f"{_kernel(k, c, bench['ceiling'])} {_s(v)}" for k, v in bench["ceiling"]["kernels"].items())
        + f". Ceiling: the best median, {bench['ceiling']['kernel']} ({bench['ceiling']['gflops']:.1f} GFLOP/s).",
        ""]
    rows = []
    for r in bench["training"]:
        rows.append([r["backbone"], r["preset"], _s(r["pipeline_ips"]), _s(r["pipeline_compute_ips"]),
                     _s(r.get("engine_ips")), _s(r["plain_ips"]), _s(r["ratio"], 3),
                     f"{r['train_gflops_per_image']:.2f}",
                     _s(r["pipeline_fraction_of_ceiling"], 2), _s(r["plain_fraction_of_ceiling"], 2),
                     "yes" if r["meets_target"] else ("no" if r["preset"] == "small" else "n/a (tiny)")])
    lines += _table(["backbone", "preset", "pipeline img/s (epoch cycle)", "pipeline img/s (loop.fit compute)",
                     "engine loop alone img/s", "plain img/s", "ratio pipeline/plain", "train GFLOP/img",
                     "pipeline / ceiling", "plain / ceiling", "every pair >= target"], rows)
    factored = [r for r in bench["training"] if r.get("factors")]
    if factored:
        lines += ["### Where the gap is: pipeline/plain as a product of three factors (per round)", "",
                  "*loop code*: the engine's `loop.fit` alone (no Ray, no MLflow, no hooks) / the plain loop, both "
                  "in the benchmark's main thread; *Ray worker*: the pipeline's loop.fit epochs / the engine loop "
                  "alone (in local mode the pipeline runs in the same main thread); *per-epoch*: the pipeline's epoch cycle / its loop.fit epochs. *val pass*: a timed val "
                  "`loop.predict` as a share of the engine loop's epoch (part of *loop code*). *between epochs*: "
                  "per steady epoch, its cycle interval minus its own `epoch_seconds`, i.e. the checkpoint and "
                  "MLflow calls in seconds (the absolute cost behind *per-epoch*, from one epoch's two clocks).", ""]
        rows = [[r["backbone"], _s(r["factors"]["loop_code"], 3), _s(r["factors"]["val_share"], 3),
                 _s(r["factors"]["ray_worker"], 3), _s(r["factors"]["per_epoch"], 3),
                 _s(r.get("between_epochs_s"), 2), _s(r["ratio"], 3)]
                for r in factored]
        lines += _table(["backbone", "loop code", "(val pass share)", "Ray worker", "per-epoch",
                         "(between epochs, s)", "ratio (each round: the product)"], rows)
    t = bench.get("thread_cost")
    if t:
        lines += [f"### Where the gap comes from: the training thread ({t['model']}, {t['img_size']} px, batch "
                  f"{t['batch_size']}, synthetic tensors, main thread and a second thread alternated)", "",
                  "Ray Train runs the training function in a thread of its worker process. The engine's workers "
                  "run with `MALLOC_ARENA_MAX=1`; the first row is what they would lose without it.", ""]
        rows = [[label, _s(t[key]["main_ips"]), _s(t[key]["thread_ips"]), _s(t[key]["ratios"], 3)]
                for label, key in (("glibc default (one arena per thread)", "default"),
                                   ("MALLOC_ARENA_MAX=1", "one_arena"))]
        lines += _table(["malloc", "main thread img/s", "second thread img/s", "thread / main"], rows)
    lines += ["## 3. Data path (cache -> augmented batch, one worker process)", ""]
    rows = [[r["backbone"], _s(r["loader_ips"]), _s(r["consumption_ips"]), _s(r["headroom"], 1),
             "yes" if r["meets_target"] else ("no" if r["preset"] == "small" else "n/a (tiny)")]
            for r in bench["data_path"]]
    lines += _table(["backbone", "loader img/s", "model consumption img/s (plain)", "headroom (x)", ">= 2x"], rows)
    o = bench["overhead"]
    lines += ["## 4. Pipeline overhead", ""]
    rows = [["ray.init (fresh local cluster)", _s(o["ray_init_s"], 2)],
            ["Ray Train worker start-up (no-op TorchTrainer)", _s(o["ray_worker_startup_s"], 2)],
            ["... fit() -> worker process created (Train controller actor, placement group)",
             _s(o["ray_worker_process_s"], 2)],
            ["... fit() -> training function entered (+ worker imports ray/torch, gloo group)",
             _s(o["ray_worker_entry_s"], 2)],
            ["... function returned -> fit() returned", _s(o["ray_teardown_s"], 2)],
            ["MLflow store + run creation", _s(o["mlflow_setup_s"], 3)],
            ["one pipeline fine-tune: wall (fit_on_ray)", _s(o["finetune_wall_s"], 1)],
            ["one pipeline fine-tune: compute (sum of epoch_seconds)", _s(o["finetune_compute_s"], 1)],
            ["one pipeline fine-tune: setup + teardown (wall - compute)", _s(o["finetune_setup_s"], 1)]]
    noop = o["dvc_noop"]
    rows.append(["no-op `dvc repro` (target < 3 s)", _s(noop["seconds"], 2) if "seconds" in noop
                 else f"not measured: {noop['not_measured']}"])
    smoke = o["smoke_study"]
    if "wall_seconds" in smoke:
        rows += [["CI smoke study `dvc repro`: wall", f"{smoke['wall_seconds']:.0f} s"],
                 ["CI smoke study: compute (sum of epoch_seconds)", f"{smoke['compute_seconds']:.0f} s"],
                 ["CI smoke study: setup (wall - compute)", f"{smoke['setup_seconds']:.0f} s"],
                 ["CI smoke study: peak RSS of the process tree", f"{smoke['peak_tree_rss_bytes'] / 2**30:.2f} GiB"],
                 ["CI smoke study: before the first stage (fetch, Ray head)", f"{smoke['before_first_stage_s']:.0f} s"]]
        rows += [[f"CI smoke study: {kind} stages ({k['count']})",
                  f"{k['seconds']:.0f} s (each {_s(k['per_stage'], 1)})"]
                 for kind, k in smoke["stages"].items()]
    else:
        rows.append(["CI smoke study", f"not measured: {smoke['not_measured']}"])
    lines += _table(["what", "seconds (or as stated)"], rows)
    lines += [f"Ray worker saw: {o['ray_worker_view']}.", ""]
    h = o.get("ray_train_helpers")
    if h:
        lines += [f"Ray Train's helper processes while a one-worker run's training function idles "
                  f"({_s(h['window_s'], 0)} s windows, {h['cpus']} CPUs): CPU seconds per second. They run "
                  "throughout every fine-tune, beside the worker; Ray's daemons, which the plain loop's process "
                  "has too, are not counted.", ""]
        rows = [[name, _s(v, 3)] for name, v in h["cpu_per_s"].items()]
        rows += [["all helpers", _s(h["train_helpers_cpu_per_s"], 3)],
                 ["all helpers, share of the machine", _s(h["machine_share"], 3)],
                 ["(the idle worker's own Ray threads)", _s(h["worker_idle_cpu_per_s"], 3)]]
        lines += _table(["process", "CPU s/s"], rows)
    s = bench["scaling"]
    lines += [f"## 5. Scaling on this machine ({s['backbone']}, pipeline path, 1 CPU per worker)", ""]
    rows = [[str(r["num_workers"]), str(r["cpus_per_worker"]), _s(r["images_per_s"]),
             _s(r["speedup"], 2) if r.get("speedup") else "1.00"] for r in s["runs"]]
    lines += _table(["workers", "CPUs/worker", "img/s (epoch cycle)", "speed-up vs 1 worker"], rows)
    lines += gpu_lines(bench["gpu"])
    lines += ["## Notes", "", *[f"- {n}" for n in bench["notes"]], ""]
    return "\n".join(lines)


def gpu_lines(g: dict[str, Any]) -> list[str]:
    """Section 5b (``benchmarks.gpu``): the bare step against the matmul rate, and the engine's GPU path."""
    lines = ["## 5b. GPU ceiling (bf16)", ""]
    if "skipped" in g:
        return [*lines, f"Skipped: {g['skipped']}.", ""]
    lines += [f"{g['device']} (torch {g.get('torch', '?')}); dense bf16 matmul: {_s(g['bf16_matmul_tflops'])} "
              "TFLOP/s. Bare step: synthetic on-device batches, the fastest settings (cuDNN autotuning).", ""]
    rows = [[r["backbone"], str(r["batch"]), "yes" if r["compile"] else "no", _s(r["images_per_s"]),
             f"{r['train_gflops_per_image']:.1f}", _s(r["achieved_tflops"]), _s(r["fraction_of_matmul"], 2)]
            for r in g["models"]]
    lines += _table(["model", "batch", "torch.compile", "img/s", "train GFLOP/img", "TFLOP/s",
                     "fraction of matmul"], rows)
    if g.get("pipeline"):
        lines += ["### The engine's GPU path (Ray Train worker with a GPU, real data path, MLflow, checkpoints)", "",
                  "Pipeline img/s (epoch cycle and loop.fit's epochs) against the bare step at the protocol's "
                  "batch with the worker's settings (deterministic algorithms, no cuDNN autotuning), and the "
                  "data path alone on the worker's CPUs (cached uint8 -> augmented batch, in the training "
                  "process).", ""]
        rows = [[r["backbone"], str(r["batch"]), str(r["loader_workers"]), f"{r['device']}, {r['precision']}"
                 f"{', channels-last' if r['channels_last'] else ''}", _s(r["pipeline_cycle_ips"]),
                 _s(r["pipeline_compute_ips"]), _s(r["bare_step"]["images_per_s"]), _s(r["cycle_vs_bare"], 3),
                 _s(r["loader_ips"]), f"{r['loader_vs_bare']:.2f}", _s(r["between_epochs_s"], 2)]
                for r in g["pipeline"]]
        lines += _table(["model", "batch", "ray.loader_workers", "worker trained on", "pipeline img/s (cycle)",
                         "pipeline img/s (compute)",
                         "bare step img/s", "pipeline / bare", "data path img/s", "data path / bare",
                         "between epochs, s"], rows)
    return lines


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(bench: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    write_atomic(json_path, json.dumps(bench, indent=2) + "\n")
    write_atomic(md_path, markdown(bench))
    return json_path, md_path
