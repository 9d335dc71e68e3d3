"""Parameter and byte accounting of a graph, by category: used by plan, inspect and the report.
Active parameters count each routed-expert tensor at top_k / num_experts of its size."""

from __future__ import annotations

from dataclasses import dataclass, field

from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import CATEGORIES, INPUT_SCALE_CATEGORY
from nemocompile.graph.storage import stored_nbytes


@dataclass
class CategoryStats:
    params: int = 0
    active: float = 0.0
    bytes: int = 0


@dataclass
class ParamStats:
    categories: dict[str, CategoryStats] = field(default_factory=dict)

    def _sum(self, attr: str, include_mtp: bool) -> float:
        return float(sum(getattr(s, attr) for name, s in self.categories.items() if include_mtp or name != "mtp"))

    @property
    def params_total(self) -> int:
        """Parameters without MTP, as models are usually quoted."""
        return int(self._sum("params", include_mtp=False))

    @property
    def params_mtp(self) -> int:
        return self.categories["mtp"].params if "mtp" in self.categories else 0

    @property
    def params_active(self) -> int:
        return round(self._sum("active", include_mtp=False))

    @property
    def params_active_without_embeddings(self) -> int:
        embeddings = self.categories.get("embeddings", CategoryStats()).active
        return round(self._sum("active", include_mtp=False) - embeddings)

    @property
    def bytes_total(self) -> int:
        """Stored bytes of every parameter, MTP included."""
        return int(self._sum("bytes", include_mtp=True))

    @property
    def bits_per_element(self) -> float:
        params = self._sum("params", include_mtp=True)
        return 8 * self.bytes_total / params if params else 0.0

    def bits_of(self, category: str) -> float:
        entry = self.categories.get(category)
        return 8 * entry.bytes / entry.params if entry and entry.params else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "params_total": self.params_total,
            "params_active": self.params_active,
            "params_active_without_embeddings": self.params_active_without_embeddings,
            "params_mtp": self.params_mtp,
            "bytes_total": self.bytes_total,
            "bits_per_element": round(self.bits_per_element, 4),
            "categories": {name: {"params": s.params, "active": round(s.active), "bytes": s.bytes,
                                  "bits_per_element": round(self.bits_of(name), 4)}
                           for name, s in self.categories.items()},
        }


def _top_k_by_scope(graph: Graph) -> dict[str, int]:
    return {op.scope: op.attrs.int("top_k") for op in graph.ops if op.opname in ("moe", "moe_router", "moe_route")}


def param_stats(graph: Graph, extra_mtp_params: int = 0, mtp_bits: int = 16) -> ParamStats:
    """`extra_mtp_params` adds MTP parameters known only from config.json (plan mode)."""
    top_k = _top_k_by_scope(graph)
    stats = ParamStats({name: CategoryStats() for name in CATEGORIES})
    for weight in graph.weights:
        entry = stats.categories.setdefault(weight.category, CategoryStats())
        entry.bytes += stored_nbytes(weight.type)
        if weight.category == INPUT_SCALE_CATEGORY:
            continue  # calibration constants, not model parameters: bytes only
        count = weight.type.numel()
        entry.params += count
        if weight.category == "routed_experts":
            scope = weight.name.rsplit(".", 1)[0]
            experts = weight.type.shape[0]
            assert isinstance(experts, int)
            entry.active += count * top_k.get(scope, experts) / experts
        elif weight.category != "mtp":
            entry.active += count
    if extra_mtp_params:
        stats.categories["mtp"].params += extra_mtp_params
        stats.categories["mtp"].bytes += extra_mtp_params * mtp_bits // 8
    stats.categories = {name: s for name, s in stats.categories.items() if s.params or s.bytes}
    return stats
