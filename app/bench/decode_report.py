"""``bench decode``'s table and verdicts, from the samples of its sides.

Per side: tokens/s (median over rounds of wall time, prefill included), ms per decoded token and
CPU ms per token. Targets checked:

- issue 3, per weight format: at exit k of L the ms/token is at most (k/L + 0.15) x the format's
  full-depth ms/token; full depth makes at least 2x the tokens/s of HF ``generate``;
- issue 12, at the best format (the fastest at full depth): full depth at least 1.0x llama.cpp's
  tokens/s, exit L/2 at least 2x llama.cpp's, full depth at least 3x HF ``generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.bench.common import median, table

HF_TARGET = 2.0  # issue 3
EXIT_SLACK = 0.15  # issue 3
VS_LLAMA_FULL = 1.0  # issue 12
VS_LLAMA_HALF = 2.0  # issue 12, exit L/2
VS_HF_FULL = 3.0  # issue 12


def summary(runs: Sequence[dict[str, float]], n: int) -> dict[str, float]:
    return {
        "tokens_per_s": n / median([s["seconds"] for s in runs]),
        "ms_per_token": median([s["ms_per_token"] for s in runs]),
        "cpu_ms_per_token": median([s["cpu_seconds"] for s in runs]) * 1000 / n,
    }


def report(
    samples: dict[str, list[dict[str, float]]],
    tokens: dict[str, list[int]],
    info: Any,
    formats: Sequence[str],
    kernels: dict[str, str],
    n: int,
) -> dict[str, Any]:
    """Print the table and verdicts; return the JSON parts (``hf_generate``, ``llama_cpp``,
    ``formats``, ``exits`` of the first format, ``verdict``)."""
    L = info.num_layers
    hf = summary(samples["hf"], n)
    llama = summary(samples["llama.cpp"], n) if "llama.cpp" in samples else None
    by_format: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        full = summary(samples[f"{fmt}/{L}"], n) if L in info.exits else None
        rows = []
        for k in info.exits:
            s = summary(samples[f"{fmt}/{k}"], n)
            vs_full = s["ms_per_token"] / full["ms_per_token"] if full else float("nan")
            rows.append(
                {
                    "exit_layer": k,
                    **s,
                    "speedup_vs_hf": s["tokens_per_s"] / hf["tokens_per_s"],
                    "cpu_speedup_vs_hf": hf["cpu_ms_per_token"] / s["cpu_ms_per_token"],
                    "speedup_vs_llama_cpp": s["tokens_per_s"] / llama["tokens_per_s"]
                    if llama
                    else None,
                    "ms_vs_full_depth": vs_full,
                    "limit_k_over_L_plus_0_15": k / L + EXIT_SLACK,
                    "within_limit": vs_full <= k / L + EXIT_SLACK,
                }
            )
        by_format[fmt] = {"kernel": kernels.get(fmt, ""), "exits": rows}
    verdict = _verdict(by_format, hf, llama, tokens, info, formats)
    head = ["weights", "exit", "tok/s", "ms/token", "CPU ms/tok", "x HF", "x llama.cpp", "exit ok"]
    lines: list[list[Any]] = [["float32 (HF)", f"{L}/{L}", *_cells(hf), 1.0, _ratio(hf, llama), ""]]
    if llama:
        lines.append(
            ["Q4_1 GGUF", f"llama.cpp {L}/{L}", *_cells(llama), _ratio(llama, hf), 1.0, ""]
        )
    for fmt, part in by_format.items():
        for r in part["exits"]:
            lines.append(
                [
                    fmt,
                    f"{r['exit_layer']}/{L}",
                    *_cells(r),
                    r["speedup_vs_hf"],
                    r["speedup_vs_llama_cpp"] if llama else "",
                    "yes" if r["within_limit"] else "NO",
                ]
            )
    print(table(head, lines))
    print()
    for line in verdict["lines"]:
        print(line)
    out: dict[str, Any] = {
        "hf_generate": hf,
        "formats": by_format,
        "exits": by_format[formats[0]]["exits"],
        "verdict": verdict,
    }
    if llama:
        out["llama_cpp"] = llama
    return out


def _cells(s: dict[str, float]) -> list[float]:
    return [s["tokens_per_s"], s["ms_per_token"], s["cpu_ms_per_token"]]


def _ratio(a: dict[str, float], b: dict[str, float] | None) -> Any:
    return a["tokens_per_s"] / b["tokens_per_s"] if b else ""


def _verdict(
    by_format: dict[str, dict[str, Any]],
    hf: dict[str, float],
    llama: dict[str, float] | None,
    tokens: dict[str, list[int]],
    info: Any,
    formats: Sequence[str],
) -> dict[str, Any]:
    L = info.num_layers
    fulls = {
        f: next((r for r in p["exits"] if r["exit_layer"] == L), None) for f, p in by_format.items()
    }
    best = max(formats, key=lambda f: fulls[f]["tokens_per_s"] if fulls[f] else 0.0)
    full = fulls[best]
    half = next((r for r in by_format[best]["exits"] if r["exit_layer"] == L // 2), None)
    vs_hf = full["speedup_vs_hf"] if full else float("nan")
    v: dict[str, Any] = {
        "best_format": best,
        "full_depth_speedup_vs_hf": vs_hf,
        "issue3_speedup_met": vs_hf >= HF_TARGET,
        "issue3_exit_targets_met": {
            f: all(r["within_limit"] for r in p["exits"]) for f, p in by_format.items()
        },
        "issue12_full_vs_hf_met": vs_hf >= VS_HF_FULL,
    }
    lines = [
        f"best format at full depth: {best}; {vs_hf:.2f}x HF generate tokens/s "
        f"(issue 3 target >= {HF_TARGET}x: {_met(vs_hf >= HF_TARGET)}; "
        f"issue 12 target >= {VS_HF_FULL}x: {_met(vs_hf >= VS_HF_FULL)})"
    ]
    if llama and full:
        vs_llama = full["tokens_per_s"] / llama["tokens_per_s"]
        v["full_depth_vs_llama_cpp"] = vs_llama
        v["issue12_full_vs_llama_met"] = vs_llama >= VS_LLAMA_FULL
        lines.append(
            f"full depth ({best}) vs llama.cpp: {vs_llama:.2f}x tokens/s "
            f"(target >= {VS_LLAMA_FULL}x: {_met(vs_llama >= VS_LLAMA_FULL)})"
        )
        if half:
            vs_half = half["tokens_per_s"] / llama["tokens_per_s"]
            v["half_depth_exit"] = L // 2
            v["half_depth_vs_llama_cpp"] = vs_half
            v["issue12_half_vs_llama_met"] = vs_half >= VS_LLAMA_HALF
            lines.append(
                f"exit {L // 2}/{L} ({best}) vs llama.cpp full depth: {vs_half:.2f}x tokens/s "
                f"(target >= {VS_LLAMA_HALF}x: {_met(vs_half >= VS_LLAMA_HALF)})"
            )
    for f in formats:
        lines.append(
            f"{f} ({by_format[f]['kernel']}): exit targets "
            f"{_met(v['issue3_exit_targets_met'][f])}; {_agreement(tokens, f, info)}"
        )
    v["lines"] = lines
    return v


def _agreement(tokens: dict[str, list[int]], fmt: str, info: Any) -> str:
    """How far the format's full-depth greedy tokens equal HF's (up to the engine's first EOS:
    ``generate``'s min_new_tokens forbids EOS, ``ignore_eos`` lets the engine take it)."""
    hf, ours = tokens.get("hf", []), tokens.get(f"{fmt}/{info.num_layers}", [])
    same = next(
        (i for i, (a, b) in enumerate(zip(hf, ours, strict=False)) if a != b),
        min(len(hf), len(ours)),
    )
    eos = next((i for i, t in enumerate(ours) if t in info.eos_token_ids), None)
    if eos is not None and same >= eos:
        return f"greedy tokens equal to HF up to the first EOS (position {eos})"
    return f"greedy tokens equal to HF for the first {same} of {len(ours)}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"
