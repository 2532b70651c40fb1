"""The GPU targets of the project, judged from one result document (``targets`` in the JSON).

| target | measured | limit |
|---|---|---|
| host time per call, fwd+bwd | t(bnkernels default) / t(F.batch_norm), 32x64x8x8 fp32 | <= 1.2 |
| host time per call, fwd | the same, training forward | <= 1.5 |
| VGG-16 training step | t(bnkernels default) / t(torch BatchNorm), per dtype and layout | <= 0.95 |
| ResNet-50 training step | the same | <= 1.0 |
| kernel goals | the summary's goals (:data:`.suite.GOALS`), on CUDA-graph rows where run | each |

Every target is listed whether or not it was measured (``value`` None: not measured) and
``met`` is True / False only in a full GPU run (None on the CPU, in a smoke run, or without a
value). Targets are measured, never asserted: a missed one does not fail the command.
"""

from __future__ import annotations

from .e2e import BASELINE as E2E_BASELINE
from .e2e import LIMITS as E2E_LIMITS
from .providers import AUTO

OVERHEAD_LIMITS = {"fwd+bwd": 1.2, "fwd": 1.5}  # host time per call, x F.batch_norm


def _target(name: str, section: str, test: str, value, limit: float, compare: str,
            claims: bool, where: str | None = None) -> dict:
    met = None
    if claims and value is not None:
        met = value <= limit if compare == "<=" else value >= limit
    return {"name": name, "section": section, "test": test, "value": value, "limit": limit,
            "compare": compare, "met": met, "where": where}


def evaluate(doc: dict) -> list[dict]:
    """The targets of a result document (needs its ``overhead``, ``e2e``, ``summary``,
    ``performance_claims`` and, for the e2e configurations planned, ``e2e_timing``)."""
    claims = bool(doc["performance_claims"])
    sections = doc.get("sections", [])
    out: list[dict] = []
    if "overhead" in sections:
        rows = doc["overhead"]
        base = doc.get("overhead_timing", {}).get("baseline", "F.batch_norm")
        for pass_, limit in OVERHEAD_LIMITS.items():
            row = next((r for r in rows if r["provider"] == AUTO.name and
                        r["op"] == "batch_norm" and r["pass"] == pass_), None)
            out.append(_target(
                f"host {pass_} per call", "overhead",
                f"host time per call, {pass_}, bnkernels.batch_norm (default backend) / "
                f"F.batch_norm ({base})", row and row["ratio_vs_torch"], limit, "<=", claims,
                row and "x".join(map(str, row["shape"])) + f" {row['dtype']}"))
    if "e2e" in sections:
        rows = doc["e2e"]
        for c in doc.get("e2e_timing", {}).get("configs", []):
            row = next((r for r in rows if r["provider"] == AUTO.name and r["model"] ==
                        c["model"] and r["dtype"] == c["dtype"] and
                        r["layout"] == c["layout"]), None)
            out.append(_target(
                f"{c['model']} step {c['dtype']} {c['layout']}", "e2e",
                f"training step time, bnkernels (default backend) / torch.nn.BatchNorm2d "
                f"({E2E_BASELINE})", row and row["ratio_vs_torch"], E2E_LIMITS[c["arch"]],
                "<=", claims, f"{c['model']} {c['dtype']} {c['layout']}"))
    if "cpu" in sections and doc.get("cpu"):
        from .cpu_path import targets as cpu_targets

        out += cpu_targets(doc, _target)
    if "kernels" in sections:
        mode = doc["summary"].get("mode")
        for g in doc["summary"]["goals"]:
            out.append(_target(
                f"kernels {g['goal']}", "kernels", f"{g['test']} ({mode or '-'} mode)",
                g["value"], g["target"], g["compare"], claims,
                g["worst"] and f"worst {g['worst']['value']:.3g}: {g['worst']['where']}"))
    return out


__all__ = ["OVERHEAD_LIMITS", "evaluate"]
