"""The report: markdown tables, targets, the latency plot, and JSON without raw samples."""

from __future__ import annotations


import warnings
from typing import Any

import numpy as np
from .common import MODE_LABEL, P4_MODES, MiB, fmt


# --------------------------------------------------------------------------- report
def check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def markdown(R: dict) -> str:
    L: list[str] = []
    cfg, mach = R["config"], R["machine"]
    L.append(f"command: `{R['command']}` (cwd {R['cwd']})")
    L.append(
        f"machine: {mach['cpus']} CPUs ({mach['physical_cores']} physical, {mach['cpu_model']}), {mach['memory_gib']} GiB, "
        f"Triton server {mach['triton_server']}, onnxruntime {mach['onnxruntime']}, numpy {mach['numpy']}, "
        f"python {mach['python']}, {mach['platform']}; weightbundle at commit {mach.get('weightbundle_commit')}"
    )
    ld0, ld1 = R["load_before"], R["load_after"]
    L.append(
        f"other load: loadavg {ld0['loadavg']} before, {ld1['loadavg']} after; other tritonservers running: "
        f"{ld0['other_tritonservers']} before, {ld1['other_tritonservers']} after"
        + (f"; busy: {'; '.join(ld0['busy_processes'])}" if ld0["busy_processes"] else "")
    )
    L.append(
        f"model: big_mlp n={cfg['n']}, batch {cfg['batch']}, max_batch_size 0, "
        "intra_op_threads=0 (ORT's default for one instance, CPUs ÷ instances for several); "
        f"{cfg['p1_reps']} P1 rounds; total {R['total_s']:.0f} s" + ("; **--quick: tiny sizes, figures are not meaningful**" if cfg["quick"] else "")
    )
    L.append("")
    # P1
    p1 = R["p1"]
    L.append("### P1: update latency, ms until the first response carries the new version (median)")
    L.append("")
    sizes = list(p1["median_ms"])

    L.append("| method | " + " | ".join(sizes) + " | vs memcpy floor (" + "/".join(sizes) + ") | Triton reload / this (" + "/".join(sizes) + ") |")
    L.append("|---|" + "---:|" * (len(sizes) + 2))
    names = {"memcpy": "memcpy floor (np.copyto, in-process)", "reload": "Triton reload (new version folder + load_model)"}
    for m in p1["methods"]:
        cells = [fmt(p1["median_ms"][s][m]["total"], ".1f") for s in sizes]
        vs_floor = "/".join(f"{p1['median_ms'][s][m]['total'] / p1['median_ms'][s]['memcpy']['total']:.1f}" for s in sizes)
        vs_reload = "/".join(f"{p1['median_ms'][s]['reload']['total'] / p1['median_ms'][s][m]['total']:.1f}" for s in sizes)
        label = names.get(m) or f"{m.split(':')[0]}, {MODE_LABEL[m.split(':')[1]]}"
        L.append(f"| {label} | " + " | ".join(cells) + f" | {vs_floor if m != 'memcpy' else '1'} | " + ("" if m in ("memcpy", "reload") else vs_reload) + " |")
    L.append("")
    L.append(
        "Parts (median ms, " + "/".join(sizes) + "): *ack* = the update call (or load_model) returning; "
        "*write* = the client writing the safetensors file (file) or the version folder (reload), not included above."
    )
    L.append("")
    L.append("| method | ack | write | probes to see the new version (max) |")
    L.append("|---|---:|---:|---:|")
    for m in p1["methods"]:
        if m == "memcpy":
            continue
        d = [p1["median_ms"][s][m] for s in sizes]
        ack = "/".join(fmt(x.get("ack"), ".0f") for x in d)
        wr = "/".join(fmt(x["client_write"], ".0f") for x in d) if "client_write" in d[0] else ""
        label = names.get(m) or f"{m.split(':')[0]}, {MODE_LABEL[m.split(':')[1]]}"
        L.append(f"| {label} | {ack} | {wr} | {max(x['probes_max'] for x in d)} |")
    L.append("")
    # P2
    L.append("### P2: steady-state inference (p50 ms, batch %d)" % cfg["batch"])
    L.append("")
    L.append("| where | variant | p50 ms | vs baked |")
    L.append("|---|---|---:|---:|")
    t = R["p2_triton"]["p50_ms"]
    base = next(v for k, v in t.items() if k.startswith("plain"))
    for k, v in t.items():
        label = {"wbT": f"weightbundle {MODE_LABEL['T']}", "wbF": f"weightbundle {MODE_LABEL['F']}"}.get(k, "plain python backend, ORT baked")
        L.append(f"| Triton | {label} | {v:.2f} | {v / base:.2f}x |")
    ip = R["p2_inprocess"]["p50_ms"]
    for k, v in ip.items():
        L.append(f"| in-process | {k} | {v:.2f} | {v / ip['ORT baked']:.2f}x |")
    L.append("")
    # P3
    L.append(f"### P3: memory of the tritonserver process tree ({R['p3_model']} of weights)")
    L.append("")
    L.append("| config | state | procs | RSS MiB | PSS MiB | anon MiB | /dev/shm store MiB | /dev/shm regions MiB (n) | footprint MiB |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cname, row in R["p3"].items():
        for state, m in row.items():
            L.append(
                f"| {cname} | {state.replace('_', ' ')} | {m['processes']} | {m['rss'] / MiB:.0f} | {m['pss'] / MiB:.0f} | "
                f"{m['pss_anon'] / MiB:.0f} | {m['shm_store'] / MiB:.0f} | {m['shm_regions'] / MiB:.0f} ({m['shm_region_count']}) | "
                f"{m['footprint'] / MiB:.0f} |"
            )
    L.append("")
    ps = R["p3_summary"]
    lo, hi = cfg["p3_instances"][0], cfg["p3_instances"][-1]
    L.append(
        "footprint = anon + file PSS of the tree + this server's /dev/shm bytes, each tmpfs page counted once. "
        '"overhead probe" is the weightbundle backend with tiny weights (128x128, prepack=F): per-process overhead.'
    )
    L.append("")
    L.append(
        f"| config | per extra instance (x{lo} -> x{hi}): footprint MiB | anon MiB | weight copies per extra instance | "
        f"resident at x{hi}, idle, in weight copies = store + file + anon + regions | "
        f"after 1 update (x{hi}): growth = store + regions + anon | "
        f"during a stream of one-layer updates under load (x{hi}): growth over idle = store + file + anon |"
    )
    L.append("|---|---:|---:|---:|---|---|---|")
    for kind, d in ps.items():
        g = d.get(f"update_growth_x{hi}")
        gs = f"{g['total_copies']:.2f} = {g['store_copies']:.2f} + {g['regions_copies']:.2f} + {g['anon_copies']:.2f}" if g else ""
        st = d.get(f"stream_growth_x{hi}")
        gs += f" | {st['total_copies']:.2f} = {st['store_copies']:.2f} + {st['file_copies']:.2f} + {st['anon_copies']:.2f}" if st else " | "
        r = d.get(f"resident_x{hi}")
        rs = f"{r['total_copies']:.2f} = {r['store_copies']:.2f} + {r['file_copies']:.2f} + {r['anon_copies']:.2f} + {r['regions_copies']:.2f}" if r else ""
        L.append(f"| {kind} | {d['footprint_mib']:.0f} | {d['anon_mib']:.0f} | {fmt(d['weight_copies_est'], '.2f')} | {rs} | {gs} |")
    if cfg["quick"]:
        L.append("")
        L.append("With --quick the weights are tiny: these figures are per-process overhead only.")
    L.append("")
    # P4
    L.append(
        f"### P4: {cfg['p4_clients']} clients, {cfg['p4_instances']} instances, {R['p4_model']} model, "
        f"update of one layer every {cfg['p4_period'] * 1e3:.0f} ms via shm ({cfg['p4_seconds']:.0f} s per condition, 2 interleaved halves)"
    )
    L.append("")
    L.append(
        "| prepack | updates | responses | req/s | p50 ms | p99 ms | p99 vs no-update | p99 after 1 s (vs) | failed | torn "
        "| updates applied (/s) | update ack p50/p99 ms |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in P4_MODES:
        b = R["p4"][f"{m}:no updates"]
        for cond in ("no updates", "updates"):
            d = R["p4"][f"{m}:{cond}"]
            L.append(
                f"| {MODE_LABEL[m]} | {cond} | {d['responses']} | {d['throughput_rps']:.0f} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | "
                f"{d['p99_ms'] / b['p99_ms']:.2f}x | {settled(d, b)} | {d['failed']} | {d['torn']} | "
                + (
                    f"{d['updates']} ({d['updates_per_s']:.1f}/s, {d['update_failed']} failed) | "
                    f"{fmt(d['update_ack_p50_ms'], '.0f')}/{fmt(d['update_ack_p99_ms'], '.0f')} |"
                    if cond == "updates"
                    else " | |"
                )
            )
    L.append(
        "*p99 after 1 s*: only requests sent from the phase's second second on, in both conditions: without the start of "
        "each stream of updates (before a model's session for the stream is ready). Shown to explain, not a target."
    )
    unverified = {k: d["unknown_version"] for k, d in R["p4"].items() if d["unknown_version"]}
    if unverified:
        L.append(f"responses with a version the updater never announced (not verifiable): {unverified}")
    L.append("")
    # targets
    L.append("### Targets")
    L.append("")
    L.append("| target | figure | met |")
    L.append("|---|---|---|")
    for row in R["targets"]:
        L.append(f"| {row['target']} | {row['figure']} | {check(row['met'])} |")
    return "\n".join(L) + "\n"


# Issue 12's goals: P1 per transport (x the memcpy floor), P3 (weight copies at the most
# instances), P4 (p99 under updates against without).
P1_FLOOR_X = {"file": 6.0, "shm": 10.0}
P1_RELOAD_X = 10.0
P3_IDLE, P3_AFTER_UPDATE, P3_PER_INSTANCE = 2.5, 3.5, 0.1
P4_P99_X = 1.5


def targets(R: dict) -> list[dict]:
    out = []
    p1 = R["p1"]["median_ms"]
    mid = list(p1)[min(1, len(p1) - 1)]
    floor, reload = p1[mid]["memcpy"]["total"], p1[mid]["reload"]["total"]
    for m in R["p1"]["methods"]:
        if ":" not in m or m.split(":")[0] not in P1_FLOOR_X:
            continue
        tot = p1[mid][m]["total"]
        lab = f"{m.split(':')[0]}, {MODE_LABEL[m.split(':')[1]]}"
        x = P1_FLOOR_X[m.split(":")[0]]
        out.append(
            {
                "target": f"{mid} update ({lab}) within {x:g}x memcpy floor",
                "figure": f"{tot:.1f} ms = {tot / floor:.1f}x of {floor:.1f} ms",
                "met": tot <= x * floor,
            }
        )
        out.append(
            {
                "target": f"{mid} update ({lab}) >= {P1_RELOAD_X:g}x faster than Triton reload",
                "figure": f"{reload:.0f} / {tot:.1f} ms = {reload / tot:.1f}x",
                "met": reload / tot >= P1_RELOAD_X,
            }
        )
    t = R["p2_triton"]["p50_ms"]
    base = next(v for k, v in t.items() if k.startswith("plain"))
    for k, v in t.items():
        if k.startswith("wb"):
            out.append(
                {"target": f"Triton inference {k} within 1.05x of plain baked", "figure": f"{v:.2f} / {base:.2f} ms = {v / base:.2f}x", "met": v / base <= 1.05}
            )
    ip = R["p2_inprocess"]["p50_ms"]
    for k, v in ip.items():
        if k != "ORT baked":
            out.append({"target": f"in-process {k} within 1.05x of ORT baked", "figure": f"{v / ip['ORT baked']:.2f}x", "met": v / ip["ORT baked"] <= 1.05})
    hi = R["config"]["p3_instances"][-1]
    for k, d in R["p3_summary"].items():
        if not k.startswith("wb"):
            continue
        c = d["weight_copies_est"]
        r = d.get(f"resident_x{hi}")
        fig = f"{fmt(c, '.2f')} weight copies per extra instance"
        if r:
            fig += (
                f"; {r['total_copies']:.2f} copies resident at x{hi} (store {r['store_copies']:.2f}, file-backed (the shared packed file) "
                f"{r['file_copies']:.2f}, anon {r['anon_copies']:.2f}, regions {r['regions_copies']:.2f})"
            )
        out.append(
            {
                "target": f"{k}: <= {P3_IDLE:g} weight copies resident idle with {hi} instances, <= {P3_PER_INSTANCE:g} per extra instance",
                "figure": fig,
                "met": None if c is None or r is None or R["config"]["quick"] else bool(c <= P3_PER_INSTANCE and r["total_copies"] <= P3_IDLE),
            }
        )
        g = d.get(f"update_growth_x{hi}")
        if g and r:
            after = r["total_copies"] + g["total_copies"]
            out.append(
                {
                    "target": f"{k}: <= {P3_AFTER_UPDATE:g} weight copies right after an update (x{hi}, shm, history=1)",
                    "figure": f"{after:.2f} copies: idle {r['total_copies']:.2f}, then store +{g['store_copies']:.2f} (the new version and the next "
                    "staging blob; the previous version, kept for rollback, is on disk with history_on_disk)"
                    f", backend regions +{g['regions_copies']:.2f}, anon +{g['anon_copies']:.2f}",
                    "met": None if R["config"]["quick"] else bool(after <= P3_AFTER_UPDATE),
                }
            )
    for m in P4_MODES:
        b, u = R["p4"][f"{m}:no updates"], R["p4"][f"{m}:updates"]
        out.append(
            {
                "target": f"under load ({MODE_LABEL[m]}): 0 failed, 0 torn",
                "figure": f"{u['failed']} failed, {u['torn']} torn of {u['responses']}",
                "met": u["failed"] == 0 and u["torn"] == 0,
            }
        )
        out.append(
            {
                "target": f"under load ({MODE_LABEL[m]}): p99 within {P4_P99_X:g}x of no-update p99",
                "figure": f"{u['p99_ms']:.0f} / {b['p99_ms']:.0f} ms = {u['p99_ms'] / b['p99_ms']:.2f}x",
                "met": u["p99_ms"] <= P4_P99_X * b["p99_ms"],
            }
        )
    return out


def settled(d: dict, base: dict) -> str:
    """The P4 cell "p99 after 1 s (vs no-update)"; runs saved before it existed have none."""
    if "settled_p99_ms" not in d:
        return "–"
    return f"{d['settled_p99_ms']:.1f} ({d['settled_p99_ms'] / base['settled_p99_ms']:.2f}x)"


def plot(R: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the plot (pip install matplotlib)", stacklevel=2)
        return None
    p1 = R["p1"]
    sizes = list(p1["median_ms"])
    xs = [p1["bytes"][s] / MiB for s in sizes]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"memcpy": ("k", ":", "o"), "reload": ("tab:red", "-", "s")}
    colors = {"request": "tab:blue", "shm": "tab:green", "shm-staged": "tab:olive", "file": "tab:purple"}
    for m in p1["methods"]:
        ys = [p1["median_ms"][s][m]["total"] for s in sizes]
        if ":" in m:
            t, mode = m.split(":")
            ax.plot(xs, ys, color=colors[t], linestyle={"T": "-", "Tsync": "-.", "F": "--"}.get(mode, ":"), marker="o", label=f"{t}, {MODE_LABEL[mode]}")
        else:
            c, ls, mk = styles[m]
            ax.plot(xs, ys, color=c, linestyle=ls, marker=mk, label={"memcpy": "memcpy floor", "reload": "Triton reload"}[m])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(sizes)
    ax.set_xlabel("weights pushed (full update)")
    ax.set_ylabel("ms until served (median)")
    ax.set_title(f"weightbundle update latency vs Triton reload ({R['machine']['cpus']} CPUs, Triton {R['machine']['triton_server']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def strip_samples(obj: Any) -> Any:
    """results.json keeps raw samples, rounded (seconds, 6 digits)."""
    if isinstance(obj, dict):
        return {k: strip_samples(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strip_samples(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6) if np.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return strip_samples(obj.item())
    return obj
