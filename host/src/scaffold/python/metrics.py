"""A metrics policy: route and status class; a caller with the `metrics` scope sees all."""

from wit_world import exports
from wit_world.exports import metrics_policy as m
from wit_world.imports.types import Principal


class Lifecycle(exports.Lifecycle):
    def configure(self, config: str) -> None:
        pass


class MetricsPolicy(exports.MetricsPolicy):
    def labels(self, request: m.RequestSummary) -> list:
        return [
            m.Label(name="route", value=request.route),
            m.Label(name="status_class", value=f"{request.status // 100}xx"),
        ]

    def visible_series(self, caller: Principal) -> m.Visibility:
        if "metrics" in caller.scopes:
            return m.Visibility_All()
        return m.Visibility_None_()
