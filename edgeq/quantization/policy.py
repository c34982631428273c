"""The PTQ-vs-QAT policy: read the architecture, decide where to start, record why."""

from __future__ import annotations

from pydantic import BaseModel, Field
from torch import nn

_STANDARD_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


class ArchitectureScan(BaseModel):
    depthwise_convs: int = 0
    convs: int = 0
    attention: list[str] = Field(default_factory=list)
    custom_norms: list[str] = Field(default_factory=list)
    cosine_head: bool = False
    parameters: int = 0

    @property
    def style(self) -> str:
        if self.attention:
            return "attention"
        if self.depthwise_convs:
            return "mobile"
        return "resnet" if self.convs else "other"


class PolicyDecision(BaseModel):
    start: str  # "ptq" | "qat": where the policy says to start (its recommendation, recorded as it is)
    allow_qat: bool
    allow_ptq: bool
    reasons: list[str]
    scan: ArchitectureScan
    # The fast PTQ rung `auto` climbs before the recommended QAT: "transformer" (an attention graph: the
    # transformer-aware PTQ rungs), "base" (cosine scoring without attention: the base PTQ settings) or "" (none: the
    # order follows `start`, e.g. custom normalisation still starts with QAT). QAT runs only when that rung misses
    # the SLA.
    ptq_first: str = ""
    attention_graph: bool = False  # the ONNX graph has attention: the transformer PTQ rung is on the ladder


def scan_architecture(model: nn.Module, metric: str) -> ArchitectureScan:
    scan = ArchitectureScan(parameters=sum(p.numel() for p in model.parameters()), cosine_head=metric == "cosine")
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, nn.Conv2d):
            scan.convs += 1
            if m.groups > 1 and m.groups == m.in_channels:
                scan.depthwise_convs += 1
        if isinstance(m, nn.MultiheadAttention) or "attention" in cls.lower():
            scan.attention.append(name or cls)
        elif "norm" in cls.lower() and not isinstance(m, _STANDARD_NORMS):
            scan.custom_norms.append(f"{name} ({cls})")
        elif cls.lower().startswith("cosine") or isinstance(m, nn.CosineSimilarity):
            scan.cosine_head = True
    return scan


def decide(model: nn.Module, metric: str, mode: str, sla: str, graph_attention: list[str] | None = None) -> PolicyDecision:
    """The policy of docs/DESIGN.md: ResNet-style -> PTQ; mobile -> PTQ first, QAT likely; attention / custom norm /
    cosine scoring -> QAT; a fixed SLA -> QAT regardless.

    `graph_attention`: the attention nodes of the exported ONNX graph (`edgeq.quantization.ptq.attention_nodes`),
    which find attention that module names do not. For attention / cosine models under `auto` with a flexible SLA,
    the recommendation stays QAT, but the ladder first tries the fast PTQ rung (`ptq_first`): transformer PTQ takes
    seconds, QAT hours on a CPU.
    """
    scan = scan_architecture(model, metric)
    graph_attention = list(graph_attention or [])
    if graph_attention and not scan.attention:
        scan.attention = [f"ONNX {n}" for n in graph_attention]
    if scan.attention or scan.custom_norms or scan.cosine_head:
        what = (scan.attention and f"attention ({', '.join(scan.attention[:3])})"
                or scan.custom_norms and f"custom normalisation ({', '.join(scan.custom_norms[:3])})"
                or "cosine-similarity scoring")
        arch, start = f"{what}: PTQ almost always misses the SLA here, start with QAT", "qat"
    elif scan.style == "mobile":
        arch, start = f"mobile-style ({scan.depthwise_convs} depthwise convs): PTQ first, QAT likely needed", "ptq"
    elif scan.style == "resnet":
        arch, start = f"ResNet-style ({scan.convs} convs, no depthwise): PTQ", "ptq"
    else:
        arch, start = "no convs/attention found: PTQ first", "ptq"
    attention_graph = bool(graph_attention)
    first = "transformer" if attention_graph else ""
    if mode == "ptq":
        reasons = [arch, "mode: ptq in the config (no escalation to QAT)"]
        if attention_graph:
            reasons.append("attention graph: the transformer-aware PTQ rung first")
        return PolicyDecision(start="ptq", allow_qat=False, allow_ptq=True, scan=scan, reasons=reasons,
                              ptq_first=first, attention_graph=attention_graph)
    if mode == "qat":
        return PolicyDecision(start="qat", allow_qat=True, allow_ptq=False, scan=scan, reasons=[arch, "mode: qat in the config"],
                              attention_graph=attention_graph)
    if sla == "fixed":
        return PolicyDecision(start="qat", allow_qat=True, allow_ptq=False, scan=scan, attention_graph=attention_graph,
                              reasons=[arch, "quantization.sla is 'fixed': a production accuracy SLA gets QAT regardless"])
    reasons = [arch]
    if start == "qat" and not first and scan.cosine_head:
        first = "base"  # an embedder without attention in its graph: the base PTQ settings before QAT
    if start == "qat" and first:
        what = ("the transformer-aware PTQ rung (ONNX Runtime on MatMul/Gemm only, NNCF model_type TRANSFORMER)"
                if first == "transformer" else "the base PTQ settings")
        reasons.append(f"auto with a flexible SLA: {what} first (seconds; QAT takes hours on a CPU); QAT only if it "
                       "misses the SLA")
    elif attention_graph:
        reasons.append("attention graph: the transformer-aware PTQ rung first")
    return PolicyDecision(start=start, allow_qat=True, allow_ptq=True, scan=scan, reasons=reasons, ptq_first=first,
                          attention_graph=attention_graph)
