"""The bench report: scaling arithmetic, JSON, a markdown table for people, PNG plots.

:func:`write_report` writes ``report.json`` (everything, for machines and for comparing runs),
``report.md`` (what :func:`to_markdown` returns) and, with matplotlib, ``ramp.png``
(offered and written rate over the ramp), ``latency.png`` (latency histogram at the fixed
rate) and ``stages.png`` (each stage alone against end to end, bound and baseline; where the
busy time goes).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["scaling", "to_markdown", "write_report"]

log = logging.getLogger(__name__)

TARGETS = {"per_bound": 0.6, "per_baseline": 8.0, "p99_ms": 250.0}


def scaling(report: dict[str, Any], *, cores_per_node: int, processes_per_node: int,
            targets: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """Nodes needed for each target rate, from the per-core rates measured here.

    The arithmetic of the README's *Several nodes*: a worker core corrects and compresses
    (``1 / correct + 1 / compress`` core-s per GB, both measured on 1 thread); each process
    has one receiver and one writer, so it gets ``cores_per_node / processes_per_node - 2``
    workers and writes at most what the write stage did alone. A node runs
    ``processes_per_node`` processes. The second estimate takes the CPU time the whole
    pipeline process used per GB end to end on this machine instead.
    """
    st = report["stages"]
    core_s_per_gb = 1 / st["correct x1"]["gbps"] + 1 / st["compress x1"]["gbps"]
    per_core = 1 / core_s_per_gb
    workers = max(cores_per_node // processes_per_node - 2, 1)
    writer = st["write"]["gbps"]
    receive = st["receive + decode"]["gbps"]
    per_process = min(workers * per_core, writer, receive)
    limit = {workers * per_core: "compute", writer: "writer", receive: "receive"}[per_process]
    per_node = processes_per_node * per_process
    measured = report["sustained"].get("cpu_s_per_gb") or report["latency"]["cpu_s_per_gb"]
    rows = []
    for name, gbps in targets:
        nodes = math.ceil(gbps / per_node)
        rows.append({
            "target": name, "gbps": gbps,
            "worker_cores": round(gbps * core_s_per_gb, 1),
            "processes": max(math.ceil(gbps / per_process), 1),
            "nodes": nodes,
            "nodes_measured_cpu": (math.ceil(gbps * measured / cores_per_node)
                                   if measured else None),
        })
    return {
        "cores_per_node": cores_per_node, "processes_per_node": processes_per_node,
        "workers_per_process": workers, "core_s_per_gb": core_s_per_gb,
        "per_core_gbps": per_core, "writer_gbps": writer, "receive_gbps": receive,
        "per_process_gbps": per_process, "per_process_limit": limit,
        "per_node_gbps": per_node, "measured_cpu_s_per_gb": measured, "rows": rows,
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def to_markdown(r: dict[str, Any]) -> str:
    """The report as markdown tables (what the README shows)."""
    c, s, lat, ratios = r["config"], r["sustained"], r["latency"], r["ratios"]
    bound, base = r["bound"], r["baseline"]
    hz_per_gbps = 1e9 / c["train_bytes"]
    codecs = ", ".join(f"{k} {v}" for k, v in c["compression"].items())
    pct = lat["seconds"]
    p99 = pct.get("p99")
    lines = [
        f"## calstream bench: {r['machine']['host']}, {r['started']}",
        "",
        f"{len(c['modules'])} JUNGFRAU module(s) x {c['cells']} cells "
        f"({c['train_bytes'] / 1e6:.1f} MB raw per train), {c['workers']} workers, "
        f"{c['backend']} backend, float32 output ({codecs}); spool `{c['spool']}`, "
        f"destination `{c['destination']}`; {r['machine']['cpus']} CPUs, load "
        f"{' / '.join(map(str, r['machine']['load_avg']))}; {r['seconds']:.0f} s in all.",
        "",
        "| | GB/s raw | trains/s | calstream ÷ this |",
        "| --- | ---: | ---: | ---: |",
        f"| **calstream end to end** (highest rate with 0 drops{', capped' if s['capped'] else ''}"
        f") | **{s['gbps']:.3f}** | {s['rate_hz']:.1f} | |",
        f"| bound: slowest stage alone ({bound['stage']}) | {bound['gbps']:.3f} | "
        f"{bound['gbps'] * hz_per_gbps:.1f} | **{ratios['calstream_per_bound']:.2f}** |",
        f"| bound: all stages sharing the {bound['cores']} cores "
        f"({bound['core_s_per_gb']:.2f} core-s per GB, 1-thread stages summed) | "
        f"{bound['shared_cores_gbps']:.3f} | {bound['shared_cores_gbps'] * hz_per_gbps:.1f} | "
        f"{ratios['calstream_per_shared_cores_bound']:.2f} |",
        f"| baseline: NumPy + h5py Bitshuffle filter, 1 thread | {base['gbps']:.3f} | "
        f"{base['gbps'] * hz_per_gbps:.1f} | **{ratios['calstream_per_baseline']:.1f}** |",
        f"| memory copy of the same bytes | {r['stages']['memory copy']['gbps']:.2f} | | "
        f"{s['gbps'] / r['stages']['memory copy']['gbps']:.3f} |",
        "",
        f"Latency, first part received → chunks written, at {lat['fraction']:.0%} of that "
        f"({lat['rate_hz']:.1f} trains/s, {lat['gbps']:.3f} GB/s, {pct.get('n', 0)} trains, "
        f"{lat['dropped']} dropped): p50 **{_ms(pct.get('p50'))} ms**, p90 "
        f"{_ms(pct.get('p90'))} ms, p99 **{_ms(p99)} ms**, max {_ms(pct.get('max'))} ms. "
        f"CPU of the pipeline process: {s['cpu_s_per_gb']:.1f} core-s per GB at the sustained "
        f"rate, {lat['cpu_s_per_gb']:.1f} at {lat['fraction']:.0%}. Compression "
        f"{r['compression']['ratio']:.2f}x of the corrected data; files are "
        f"{r['compression']['file_bytes_per_raw_byte']:.2f}x the raw input. Peak memory of "
        f"the bench process (pipeline and stages alone): "
        f"{r['summary'].get('peak_rss_mb', 0)} MB.",
        "",
        "| target | wanted | reached | |",
        "| --- | ---: | ---: | --- |",
        _target("end to end ÷ slowest-stage bound", f"≥ {TARGETS['per_bound']}",
                ratios["calstream_per_bound"], ratios["calstream_per_bound"] >= 0.6, "{:.2f}"),
        _target("end to end ÷ baseline", f"≥ {TARGETS['per_baseline']:.0f}",
                ratios["calstream_per_baseline"], ratios["calstream_per_baseline"] >= 8, "{:.1f}"),
        _target(f"p99 latency at {lat['fraction']:.0%}", "≤ 250 ms",
                (p99 or 0) * 1e3, p99 is not None and p99 <= 0.25, "{:.0f} ms"),
        "",
        "### Each stage alone (same data)",
        "",
        "| stage | threads | GB/s raw | ms per train | how |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for st in r["stages"].values():
        lines.append(f"| {st['name']} | {st['threads']} | {st['gbps']:.3f} | "
                     f"{st['seconds_per_train'] * 1e3:.1f} | {st['note']} |")
    lines.append(f"| baseline | 1 | {base['gbps']:.3f} | {base['seconds_per_train'] * 1e3:.0f} "
                 f"| {base['note']} |")
    busy = s["stage_seconds_per_train"] or lat["stage_seconds_per_train"]
    total = sum(busy.values()) or 1.0
    lines += [
        "",
        "### Where the time goes (busy time per train in the pipeline, at the sustained rate)",
        "",
        "| stage | ms per train | share | runs on |",
        "| --- | ---: | ---: | --- |",
    ]
    where = {"correct": f"{c['workers']} workers", "compress": f"{c['workers']} workers",
             "write": "1 writer", "store": "storers (per file)"}
    for stage, sec in busy.items():
        lines.append(f"| {stage} | {sec * 1e3:.1f} | {sec / total:.0%} | {where.get(stage, '')} |")
    lines += [
        "",
        "### Ramp (each step a fixed rate; kept up = 0 drops, sender not held back, "
        "≥ 90 % written in the step's second half)",
        "",
        "| trains/s | GB/s | sent/s | written/s | dropped | core-s/GB | kept up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for st in r["ramp"]:
        lines.append(f"| {st['rate_hz']:.1f} | {st['gbps']:.3f} | {st['sent_hz']:.1f} | "
                     f"{st['written_hz']:.1f} | {st['dropped']} | {st['cpu_s_per_gb']:.1f} | "
                     f"{'yes' if st['kept_up'] else '**no**'} |")
    sc = r["scaling"]
    lines += [
        "",
        "### Scaling",
        "",
        f"From the rates above: a worker core corrects and compresses "
        f"{sc['per_core_gbps']:.2f} GB/s ({sc['core_s_per_gb']:.2f} core-s per GB); a process "
        f"has 1 receiver ({sc['receive_gbps']:.2f} GB/s) and 1 writer "
        f"({sc['writer_gbps']:.2f} GB/s); {sc['cores_per_node']}-core nodes run "
        f"{sc['processes_per_node']} processes of {sc['workers_per_process']} workers: "
        f"{sc['per_process_gbps']:.2f} GB/s per process ({sc['per_process_limit']} bound), "
        f"{sc['per_node_gbps']:.2f} GB/s per node. The last column uses the CPU the whole "
        f"pipeline process took end to end here ({sc['measured_cpu_s_per_gb'] or 0:.1f} "
        "core-s per GB) with every core busy.",
        "",
        "| for | GB/s | worker cores | processes | nodes | nodes (end-to-end CPU) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in sc["rows"]:
        lines.append(f"| {row['target']} | {row['gbps']} | {row['worker_cores']} | "
                     f"{row['processes']} | **{row['nodes']}** | {row['nodes_measured_cpu']} |")
    if r["summary"]["problems"]:
        lines += ["", "Problems counted: " + ", ".join(
            f"{k}={v}" for k, v in sorted(r["summary"]["problems"].items()))
            + " (drops are expected in the steps that were not kept up)."]
    return "\n".join(lines) + "\n"


def _target(what: str, wanted: str, value: float, met: bool, fmt: str) -> str:
    return f"| {what} | {wanted} | {fmt.format(value)} | {'met' if met else '**missed**'} |"


def write_report(report: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """Write report.json, report.md and (``plots``) the PNGs into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(to_markdown(report))
    if plots:
        paths += _plots(report, out)
    return paths


def _plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gb_per_train = r["config"]["train_bytes"] / 1e9
    paths = []

    # Ramp: offered and written rate over time.
    fig, ax = plt.subplots(figsize=(8, 4))
    tl = r["timeline"]
    if len(tl) > 4:
        t = np.array([x["t"] for x in tl])
        written = np.array([x["trains_written"] for x in tl], float)
        dropped = np.array([x["dropped"] for x in tl], float)
        k = 8  # 2 s at 4 samples per second: a few trains per window even at low rates
        rate = (written[k:] - written[:-k]) / (t[k:] - t[:-k]) * gb_per_train
        ax.plot(t[k:] - (t[k:] - t[:-k]) / 2, rate, label="written (2 s average)", color="C0")
        drops = np.flatnonzero(np.diff(dropped) > 0)
        if drops.size:
            ax.plot(t[drops + 1], np.zeros(drops.size), "x", color="C3", label="drops")
    for i, (a, b, hz) in enumerate(r["offered"]):
        ax.hlines(hz * gb_per_train, a, b, color="C1", lw=2, label="offered" if i == 0 else None)
    lat = r["latency"]
    if r["sustained"]["gbps"]:
        ax.axhline(r["sustained"]["gbps"], color="C2", ls="--", lw=1,
                   label=f"sustained {r['sustained']['gbps']:.3f} GB/s")
    bound = r["bound"]
    ax.axhline(bound["shared_cores_gbps"], color="C1", ls=":", lw=1,
               label=f"bound, all stages on {bound['cores']} cores "
                     f"{bound['shared_cores_gbps']:.2f} GB/s")
    top = 1.45 * max([hz * gb_per_train for _, _, hz in r["offered"]]
                     + [bound["shared_cores_gbps"]])  # headroom for the legend
    off_scale = " (above the plot)" if bound["gbps"] > top else ""
    ax.axhline(bound["gbps"], color="grey", ls=":", lw=1,
               label=f"bound, slowest stage ({bound['stage']}) {bound['gbps']:.2f} GB/s"
                     + off_scale)
    if r["offered"]:
        a, b, hz = r["offered"][-1]
        ax.annotate(f"latency step ({lat['fraction']:.0%})", ((a + b) / 2, hz * gb_per_train),
                    xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xlabel("time since the ramp started (s)")
    ax.set_ylabel("GB/s of raw input")
    ax.set_title("Ramp: offered rate steps and what the pipeline wrote")
    ax.set_ylim(0, top)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "ramp.png"))

    # Latency histogram at the fixed rate.
    fig, ax = plt.subplots(figsize=(8, 4))
    values = np.asarray(lat["values"]) * 1e3
    if values.size:
        ax.hist(values, bins=min(50, max(10, values.size // 3)), color="C0", alpha=0.8)
        for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            v = lat["seconds"][q] * 1e3
            ax.axvline(v, color="k", ls=style, lw=1, label=f"{q} {v:.0f} ms")
    ax.axvline(250, color="C3", lw=1, label="target p99 250 ms")
    ax.set_xlim(left=0)
    ax.set_xlabel("latency per train, first part received → chunks written (ms)")
    ax.set_ylabel("trains")
    ax.set_title(f"Latency at {lat['fraction']:.0%} of the sustained rate "
                 f"({lat['rate_hz']:.1f} trains/s, {lat['gbps']:.3f} GB/s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "latency.png"))

    # Stages alone vs end to end, and the busy-time share.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2),
                                   gridspec_kw={"width_ratios": [2.2, 1]})
    names, rates, colors = [], [], []
    for key, st in r["stages"].items():
        if key == "memory copy":
            continue
        names.append(f"{st['name']} ({st['threads']} thr)")
        rates.append(st["gbps"])
        colors.append("C3" if key == r["bound"]["stage"] else "C0")
    names += [f"all stages on {r['bound']['cores']} cores", "baseline (1 thr)",
              "calstream end to end"]
    rates += [r["bound"]["shared_cores_gbps"], r["baseline"]["gbps"], r["sustained"]["gbps"]]
    colors += ["C1", "C7", "C2"]
    y = np.arange(len(names))
    ax1.barh(y, rates, color=colors)
    for yi, v in zip(y, rates, strict=True):
        ax1.text(v, yi, f" {v:.3f}", va="center", fontsize=8)
    ax1.set_yticks(y, names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("GB/s of raw input (log scale); red: the slowest stage")
    ax1.set_title("Each stage alone, baseline, end to end")
    ax1.grid(alpha=0.3, axis="x")
    busy = r["sustained"]["stage_seconds_per_train"] or lat["stage_seconds_per_train"]
    bottom = 0.0
    for i, (stage, sec) in enumerate(busy.items()):
        ax2.bar(0, sec * 1e3, bottom=bottom, color=f"C{i}", label=f"{stage} {sec * 1e3:.1f} ms")
        bottom += sec * 1e3
    ax2.set_xticks([])
    ax2.set_ylabel("busy ms per train")
    ax2.set_title("Where the time goes")
    ax2.legend(fontsize=8, loc="upper right")
    paths.append(_save(fig, out / "stages.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
