"""The catalogue of peer runs: which tool, which method, which weight scheme.

Every run quantizes the linear layers of the decoder (never lm_head, which the bundled target ties
to the embedding) with the peer's own defaults for everything the spec does not name; the runner
records those defaults beside the results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RunSpec:
    name: str
    tool: str  # "baseline", "llmcompressor" or "gptqmodel"
    method: str  # "none", "gptq" or "awq"
    bits: int = 16
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True
    preset: str | None = None  # llm-compressor preset scheme name, when one says exactly this
    options: dict = field(default_factory=dict)  # passed to the peer's GPTQ/AWQ configuration
    default: bool = True  # part of a plain `run_peers.py` run
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


RUNS: tuple[RunSpec, ...] = (
    RunSpec("fp32", "baseline", "none", note="the unquantized target in float32"),
    # llm-compressor: GPTQModifier (defaults: actorder static, dampening_frac 0.01, block_size 128)
    RunSpec("lc-gptq-w4g128", "llmcompressor", "gptq", 4, 128, preset="W4A16"),
    RunSpec(
        "lc-gptq-w4g128-noact", "llmcompressor", "gptq", 4, 128,
        options={"actorder": None}, default=False, note="actorder off: plain GPTQ column order",
    ),
    RunSpec("lc-gptq-w3g128", "llmcompressor", "gptq", 3, 128),
    RunSpec("lc-gptq-w8ch", "llmcompressor", "gptq", 8, None),
    # llm-compressor: AWQModifier + QuantizationModifier, asymmetric as in its AWQ examples
    RunSpec("lc-awq-w4g128", "llmcompressor", "awq", 4, 128, symmetric=False, preset="W4A16_ASYM"),
    RunSpec("lc-awq-w3g128", "llmcompressor", "awq", 3, 128, symmetric=False),
    RunSpec(
        "lc-awq-w4g128-sym", "llmcompressor", "awq", 4, 128, preset="W4A16", default=False,
        note="symmetric, like quantkit's default scheme",
    ),
    # GPTQModel (defaults: damp_percent 0.05, act_group_aware True unless desc_act, true_sequential)
    RunSpec("gm-gptq-w4g128", "gptqmodel", "gptq", 4, 128, options={"desc_act": False}),
    RunSpec("gm-gptq-w4g128-desc", "gptqmodel", "gptq", 4, 128, options={"desc_act": True}),
    RunSpec(
        "gm-gptq-w4g128-plain", "gptqmodel", "gptq", 4, 128,
        options={"desc_act": False, "act_group_aware": False, "damp_percent": 0.01},
        default=False,
        note="vanilla GPTQ settings: no reordering, damp 0.01 (quantkit's defaults)",
    ),
    RunSpec("gm-gptq-w3g128", "gptqmodel", "gptq", 3, 128, options={"desc_act": False}),
    RunSpec(
        "gm-gptq-w8ch", "gptqmodel", "gptq", 8, None,
        options={"desc_act": False, "act_group_aware": False},
        note="act_group_aware off: GPTQModel refuses it without groups",
    ),
)


# Pruning (scripts/peers/run_peers_sparsity.py): llm-compressor's SparseGPTModifier (defaults: block_size
# 128, dampening_frac 0.01, sequential per decoder layer) and WandaPruningModifier, lm_head ignored.
SPARSITY_RUNS: tuple[RunSpec, ...] = tuple(
    RunSpec(f"lc-{method}-{label}", "llmcompressor", method, default=False,
            options={"sparsity": 0.5, "mask_structure": structure}, note=f"{method} {label}")
    for method in ("sparsegpt", "wanda")
    for label, structure in (("50", "0:0"), ("2of4", "2:4"))
)
RUNS = RUNS + SPARSITY_RUNS


def run_named(name: str) -> RunSpec:
    for spec in RUNS:
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in RUNS)
    raise SystemExit(f"unknown run {name!r}; known runs: {known}")


def default_runs() -> list[RunSpec]:
    return [spec for spec in RUNS if spec.default]
