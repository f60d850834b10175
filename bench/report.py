"""Turn a results-*.json into bench/RESULTS.md and bench/results.png.

    .venv/bin/python -m bench.report bench/out/results-<ts>.json [--md PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

A, B = "jfscache", "juicefs"   # ratio = A / B


def metrics(cfg: dict) -> list[tuple[str, str, str, str, bool]]:
    """(step, key, label, unit, higher_is_better)"""
    size = f"{cfg['size_mib'] / 1024:g} GiB" if cfg["size_mib"] >= 1024 else f"{cfg['size_mib']} MiB"
    m, s, kib = cfg["meta_files"], cfg["small_files"], cfg["small_kib"]
    return [
        ("seq_write", "seq_write_MBps", f"Sequential write {size}, 1 MiB writes + fsync", "MB/s", True),
        ("cold_read", "cold_read_MBps", f"Cold read {size} (from S3, empty cache)", "MB/s", True),
        ("cold_read", "cold_read_cache_fill_pct", f"Disk cache filled by that cold read (of {size})", "%", True),
        ("warm_read", "warm_read_MBps", f"Warm read {size} (local disk cache, page cache dropped)", "MB/s", True),
        ("pagecache_read", "pagecache_read_MBps", f"Page-cache re-read {size}", "MB/s", True),
        ("rand_read_4k", "rand4k_iops", "Random 4 KiB reads, warm, QD1", "IOPS", True),
        ("rand_read_4k", "rand4k_MBps", "Random 4 KiB reads, warm, QD1", "MB/s", True),
        ("rand_read_128k", "rand128k_iops", "Random 128 KiB reads, warm, QD1", "IOPS", True),
        ("rand_read_128k", "rand128k_MBps", "Random 128 KiB reads, warm, QD1", "MB/s", True),
        ("metadata", "meta_create_ops", f"Metadata: create {m:,} files in one dir", "ops/s", True),
        ("metadata", "meta_stat_ops", "Metadata: stat (kernel caches dropped)", "ops/s", True),
        ("metadata", "meta_list_entries_per_s", "Metadata: list (readdir)", "entries/s", True),
        ("metadata", "meta_lsl_cold_entries_per_s", f"Metadata: ls -l of {m:,} files (kernel caches dropped)", "entries/s", True),
        ("metadata", "meta_lsl_warm_entries_per_s", f"Metadata: ls -l of {m:,} files, again", "entries/s", True),
        ("metadata", "meta_rename_ops", "Metadata: rename", "ops/s", True),
        ("metadata", "meta_unlink_ops", "Metadata: unlink", "ops/s", True),
        ("small_write", "small_write_files_per_s", f"Write {s:,} files of {kib} KiB (fsync each)", "files/s", True),
        ("small_read_cold", "small_read_cold_files_per_s", f"Read {s:,} × {kib} KiB, 4 readers, cold (S3)", "files/s", True),
        ("small_read_cold", "small_read_cold_cache_fill_pct", "Disk cache filled by that cold read (of the files)", "%", True),
        ("small_read_warm", "small_read_warm_files_per_s", f"Read {s:,} × {kib} KiB, 4 readers, warm (disk cache)", "files/s", True),
        ("small_write_wb", "small_write_wb_files_per_s",
         f"Write {s:,} files of {kib} KiB (fsync each): jfscache --writeback, JuiceFS as default", "files/s", True),
        ("dataloader", "dataloader_files_per_s", "PyTorch DataLoader epoch, 4 workers, warm", "files/s", True),
        ("cold_read", "cold_read_rss_hwm_MiB", f"Daemon peak RSS (VmHWM), cold read {size}", "MiB", False),
        ("warm_read", "warm_read_rss_hwm_MiB", f"Daemon peak RSS (VmHWM), warm read {size}", "MiB", False),
    ]


NULLFS = [
    ("nullfs_default_ra_MBps", "default readahead"),
    ("nullfs_ra1024_MBps", "read_ahead_kb = 1024"),
    ("nullfs_direct_io_MBps", "direct_io"),
]


def values(result: dict, target: str, step: str, key: str) -> list[float]:
    out = []
    for run in result["runs"]:
        v = run.get("results", {}).get(target, {}).get(step, {}).get(key)
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(vals: list[float]) -> str:
    if not vals:
        return "—"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


def table(result: dict) -> tuple[list[str], list[tuple[str, float, bool]]]:
    rows, ratios = [], []
    for step, key, label, unit, higher in metrics(result["config"]):
        a, b = values(result, A, step, key), values(result, B, step, key)
        if not a and not b:
            continue
        ratio = None
        if a and b and statistics.median(b) > 0:
            ratio = statistics.median(a) / statistics.median(b)
            if not (step.startswith("rand_read") and unit == "MB/s"):  # same ratio as IOPS
                ratios.append((label, ratio, higher))
        rows.append(f"| {label} | {unit} | {'higher' if higher else 'lower'} | {cell(a)} | {cell(b)} | "
                    f"{'—' if ratio is None else f'{ratio:.2f}'} | {len(a)} / {len(b)} |")
    return rows, ratios


def chart(ratios: list[tuple[str, float, bool]], png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not ratios:
        fig, ax = plt.subplots(figsize=(8, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No jfscache/JuiceFS ratios in this run\n(only one target was measured)",
                ha="center", va="center", fontsize=12)
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return
    labels = [f"{l} ({'higher' if h else 'lower'} is better)" for l, _, h in ratios]
    vals = [r for _, r, _ in ratios]
    colors = ["tab:green" if (r >= 1) == h else "tab:red" for _, r, h in ratios]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ratios) + 1.5))
    y = range(len(ratios))[::-1]
    # bars grow from 1.0 (parity) to the ratio, left or right, on a log axis
    ax.barh(list(y), [v - 1.0 for v in vals], left=1.0, color=colors)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    lo, hi = min(vals + [1.0]), max(vals + [1.0])
    ax.set_xlim(lo / 1.3, hi * 1.3)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20, 50, 100)
             if lo / 1.3 <= t <= hi * 1.3]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.2f} " if v >= 1 else f" {v:.2f} ", va="center", fontsize=8,
                ha="left" if v >= 1 else "right")
    ax.set_xlabel("jfscache / JuiceFS (median of runs; log scale; green = jfscache better)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write(result: dict, md: Path, png: Path, json_path: Path | None = None) -> None:
    rows, ratios = table(result)
    nruns = len(result["runs"])
    cfg = result["config"]
    v = result.get("versions", {})
    mach = result.get("machine", {})
    lines = [
        "# Benchmark results: jfscache vs JuiceFS CE",
        "",
        f"Generated by `{result.get('command', 'python -m bench.run')}` on {result.get('started', '?')}"
        + (" (QUICK smoke-test sizes)" if result.get("quick") else "") + ".",
        f"Runs: {nruns}; targets: {', '.join(result.get('targets', []))}; "
        f"machine: {mach.get('cpus', '?')} CPUs, kernel {mach.get('kernel', '?')}, "
        f"{'Redis on a unix socket' if result.get('redis_unix') else 'loopback Redis'} + SeaweedFS S3.",
        f"Versions: JuiceFS `{v.get('juicefs', '—')}`, jfscache `{v.get('jfscache', '—')}`, "
        f"SeaweedFS `{v.get('seaweedfs', '?')}`, `{v.get('redis', '?')}`.",
        f"Both targets: same Redis (db 2 / db 1), same S3 server (one bucket each), disk cache "
        f"{result.get('cache_mib')} MiB; jfscache memory cache {result.get('mem_cache_mib')} MiB.",
        "",
        "Cells are the median over runs, with (min–max) when there are several runs. "
        "**Ratio = jfscache / JuiceFS**: for throughput rows (MB/s, IOPS, ops/s, files/s) "
        "higher is better, so a ratio above 1 means jfscache is faster; for RSS rows lower is "
        "better, so a ratio below 1 means jfscache uses less memory. MB = 10^6 bytes. "
        "n = runs with a figure (jfscache / JuiceFS).",
        "",
        "| Workload | Unit | Better | jfscache | JuiceFS | Ratio | n |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"![ratios]({png.name})" if png.parent == md.parent else f"Chart: `{png}`",
        "",
    ]
    nf = []
    for key, label in NULLFS:
        vals = [float(r["nullfs"][key]) for r in result["runs"]
                if isinstance(r.get("nullfs", {}).get(key), (int, float))]
        if vals:
            nf.append(f"| {label} | {cell(vals)} | {len(vals)} |")
    if nf:
        ras = {r["nullfs"].get("nullfs_default_readahead_kb") for r in result["runs"] if r.get("nullfs")}
        lines += [
            "## Ceiling: a null pyfuse3 filesystem",
            "",
            f"`bench/nullfs.py` answers read() from a preallocated buffer; sequential 1 MiB reads of "
            f"{cfg['size_mib']} MiB after drop_caches (default read_ahead_kb: "
            f"{', '.join(str(x) for x in ras)}). No pyfuse3 daemon can read faster here.",
            "",
            "| nullfs | MB/s | n |",
            "| --- | --- | --- |",
            *nf,
            "",
        ]
    errs = []
    for name, msg in result.get("failed_targets", {}).items():
        errs.append(f"- {name}: could not be formatted/mounted: {msg.splitlines()[0][:300]}")
    for r in result["runs"]:
        for name, e in r.get("errors", {}).items():
            if isinstance(e, str):
                errs.append(f"- run {r['run'] + 1}, {name}: {e.splitlines()[0][:300]}")
                continue
            for step, msg in e.items():
                errs.append(f"- run {r['run'] + 1}, {name}, {step}: {msg.splitlines()[0][:300]}")
    notes = list(result.get("notes", []))
    for name in (A, B):
        for step, key, what in (("warm_read", "warm_read_fill_passes", "the warm read of the big file"),
                                ("small_read_warm", "small_read_warm_fill_passes", "the warm small-file read")):
            passes = values(result, name, step, key)
            if any(passes):
                notes.append(f"{name}: before {what}, {', '.join(f'{p:g}' for p in passes)} untimed extra "
                             f"read pass(es) (per run) were needed until its disk cache held all the data "
                             f"(it had not cached every block during the cold read; see the 'Disk cache "
                             f"filled' rows)")
    for name, argv in result.get("mount_argv", {}).items():
        notes.append(f"{name} mounted with: `{argv}`")
    if notes or errs:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + errs + [""]
    if json_path:
        try:
            shown = Path(json_path).resolve().relative_to(Path(__file__).resolve().parent.parent)
        except ValueError:
            shown = json_path
        lines += [f"Raw figures: `{shown}` (bench/out/ is not committed).", ""]
    # Sections written by hand in the existing report (targets, other
    # benches' results) are kept after the generated ones, unchanged.
    if md.exists() and not result.get("quick"):
        lines += _hand_sections(md.read_text())
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
    chart(ratios, png, f"jfscache / JuiceFS, {nruns} run(s)"
          + (" — QUICK sizes" if result.get("quick") else ""))


GENERATED_SECTIONS = ("## Ceiling: a null pyfuse3 filesystem", "## Notes")


def _hand_sections(text: str) -> list[str]:
    """The `## ` sections of a report that this module does not write."""
    kept: list[str] = []
    keep = False
    for line in text.splitlines():
        if line.startswith("## "):
            keep = line.strip() not in GENERATED_SECTIONS
        if keep:
            kept.append(line)
    return kept + [""] if kept else []


def main(argv=None) -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--md", default=str(here / "RESULTS.md"))
    ap.add_argument("--png", default=str(here / "results.png"))
    args = ap.parse_args(argv)
    result = json.loads(Path(args.json).read_text())
    write(result, Path(args.md), Path(args.png), Path(args.json))
    print(f"wrote {args.md} and {args.png}")


if __name__ == "__main__":
    main()
