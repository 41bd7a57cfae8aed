"""Strict JSON schemas of the two custom resources the chart renders (kubernetes-validate bundles
only the built-in kinds): the fields of the Prometheus Operator's ServiceMonitor
(monitoring.coreos.com/v1) and KEDA's ScaledObject (keda.sh/v1alpha1) that a chart may set, as
their CRDs define them; anything else is an unknown field and fails, as in strict mode."""

from __future__ import annotations

from typing import Any

import jsonschema

_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
# The Prometheus Operator's Duration: 30s, 1m30s, ...
_DURATION: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_METADATA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                   "namespace": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP},
}
_LABEL_SELECTOR: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}


def _kind(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                       "spec": spec},
    }


SERVICE_MONITOR = _kind("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "additionalProperties": False,
    "required": ["selector", "endpoints"],
    "properties": {
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "additionalProperties": False,
                              "properties": {"any": {"type": "boolean"},
                                             "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "sampleLimit": {"type": "integer", "minimum": 0},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]}, "path": {"type": "string"},
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]}, "interval": _DURATION,
                "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                "honorTimestamps": {"type": "boolean"},
                "relabelings": {"type": "array", "items": {"type": "object"}},
                "metricRelabelings": {"type": "array", "items": {"type": "object"}},
            },
        }},
    },
})

SCALED_OBJECT = _kind("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object",
    "additionalProperties": False,
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                           "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                          "apiVersion": {"type": "string"},
                                          "envSourceContainerName": {"type": "string"}}},
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "idleReplicaCount": {"type": "integer", "minimum": 0},
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "advanced": {"type": "object"},
        "fallback": {"type": "object"},
        "triggers": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["type", "metadata"],
            "properties": {
                "type": {"type": "string"}, "name": {"type": "string"},
                # Every value a string: KEDA refuses numbers and booleans here.
                "metadata": _STRING_MAP,
                "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                      "properties": {"name": {"type": "string"},
                                                     "kind": {"enum": ["TriggerAuthentication",
                                                                       "ClusterTriggerAuthentication"]}}},
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "useCachedMetrics": {"type": "boolean"},
            },
        }},
    },
})

SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
           ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT}


def validate(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless `doc` is a valid custom resource of a known kind."""
    schema = SCHEMAS[(doc["apiVersion"], doc["kind"])]
    jsonschema.Draft202012Validator(schema).validate(doc)
