"""Structural JSON schemas for the custom resources the chart renders, which kubernetes-validate cannot know.

Hand-written subsets of the upstream CRDs (prometheus-operator monitoring.coreos.com/v1 ServiceMonitor and
PrometheusRule, KEDA keda.sh/v1alpha1 ScaledObject, Gateway API Inference Extension inference.networking.k8s.io/v1
InferencePool): the fields the chart uses, their types, required fields, and known field names at every level
the chart writes, so a typo fails here and not in a cluster.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_INT = {"type": "integer"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_ANY: dict[str, Any] = {}


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": required or []}


_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _closed(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA, "spec": spec},
        ["apiVersion", "kind", "metadata", "spec"],
    )


_ENDPOINT_FIELDS = (
    "targetPort",
    "scheme",
    "params",
    "tlsConfig",
    "bearerTokenFile",
    "bearerTokenSecret",
    "authorization",
    "honorLabels",
    "honorTimestamps",
    "trackTimestampsStaleness",
    "basicAuth",
    "oauth2",
    "metricRelabelings",
    "relabelings",
    "proxyUrl",
    "followRedirects",
    "enableHttp2",
    "filterRunning",
)
SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _closed(
        {
            "selector": _closed({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}}),
            "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}}),
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": _closed(
                    {
                        "port": _STR,
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        **{name: _ANY for name in _ENDPOINT_FIELDS},
                    }
                ),
            },
            **{
                name: _ANY
                for name in (
                    "jobLabel",
                    "targetLabels",
                    "podTargetLabels",
                    "sampleLimit",
                    "targetLimit",
                    "labelLimit",
                    "labelNameLengthLimit",
                    "labelValueLengthLimit",
                    "attachMetadata",
                    "scrapeProtocols",
                    "keepDroppedTargets",
                    "bodySizeLimit",
                    "scrapeClass",
                )
            },
        },
        ["selector", "endpoints"],
    ),
)

_RULE = {
    "oneOf": [
        _closed(
            {
                "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                "expr": _STR,
                "for": _DURATION,
                "keep_firing_for": _DURATION,
                "labels": _STR_MAP,
                "annotations": _STR_MAP,
            },
            ["alert", "expr"],
        ),
        _closed({"record": _STR, "expr": _STR, "labels": _STR_MAP}, ["record", "expr"]),
    ]
}
PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    _closed(
        {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": _closed(
                    {
                        "name": _STR,
                        "interval": _DURATION,
                        "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        "partial_response_strategy": _STR,
                        "limit": _INT,
                        "query_offset": _DURATION,
                        "labels": _STR_MAP,
                    },
                    ["name", "rules"],
                ),
            },
        },
        ["groups"],
    ),
)

# KEDA reads every trigger metadata value as a string; the Prometheus scaler needs these three.
_PROMETHEUS_TRIGGER_METADATA = {
    "type": "object",
    "additionalProperties": {"type": "string"},
    "required": ["serverAddress", "query", "threshold"],
    "properties": {"threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}},
}
SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    _closed(
        {
            "scaleTargetRef": _closed({"apiVersion": _STR, "kind": _STR, "name": _STR, "envSourceContainerName": _STR}, ["name"]),
            "pollingInterval": {"type": "integer", "minimum": 1},
            "initialCooldownPeriod": _INT,
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "idleReplicaCount": _INT,
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "fallback": _ANY,
            "advanced": _closed(
                {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    # behavior is an autoscaling/v2 HorizontalPodAutoscalerBehavior: the test checks it with kubernetes-validate.
                    "horizontalPodAutoscalerConfig": _closed({"name": _STR, "behavior": {"type": "object"}}),
                    "scalingModifiers": _ANY,
                }
            ),
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": _closed(
                    {
                        "type": {"const": "prometheus"},
                        "name": _STR,
                        "metadata": _PROMETHEUS_TRIGGER_METADATA,
                        "authenticationRef": _ANY,
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                    },
                    ["type", "metadata"],
                ),
            },
        },
        ["scaleTargetRef", "triggers"],
    ),
)

# From the extension's config/crd/bases/inference.networking.k8s.io_inferencepools.yaml (v1): its patterns,
# bounds and enums, and its CEL rules as JSON Schema (unique port numbers; a Service picker needs a port).
_LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}
_PORT = _closed({"number": {"type": "integer", "minimum": 1, "maximum": 65535}}, ["number"])
_DNS_GROUP = {
    "type": "string",
    "maxLength": 253,
    "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}
_ENDPOINT_PICKER_REF = {
    **_closed(
        {
            "group": _DNS_GROUP,
            "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"},
            "name": {"type": "string", "minLength": 1, "maxLength": 253},
            "port": _PORT,
            "failureMode": {"enum": ["FailOpen", "FailClose"]},
        },
        ["name"],
    ),
    # kind defaults to Service, and a Service needs a port.
    "anyOf": [{"required": ["port"]}, {"required": ["kind"], "properties": {"kind": {"not": {"const": "Service"}}}}],
}
INFERENCE_POOL = _resource(
    "inference.networking.k8s.io/v1",
    "InferencePool",
    _closed(
        {
            "selector": _closed(
                {
                    "matchLabels": {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": 64,
                        "additionalProperties": _LABEL_VALUE,
                    }
                },
                ["matchLabels"],
            ),
            # Items hold only `number`, so unique items means unique port numbers.
            "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "uniqueItems": True, "items": _PORT},
            "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
            "endpointPickerRef": _ENDPOINT_PICKER_REF,
        },
        # endpointPickerRef became optional after v1.0; without one no gateway routes to the pool, so the chart requires it.
        ["selector", "targetPorts", "endpointPickerRef"],
    ),
)

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL,
}
