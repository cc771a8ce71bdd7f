"""weightbundle's Triton python-based backend.

Deployed as ``<backend-directory>/weightbundle/model.py``; a model selects it with
``backend: "weightbundle"`` and keeps ``<version>/model.bundle`` in its folder.
Thin by design: parse config, convert tensors, build responses.  The work is in
``weightbundle.serving`` (unit-tested without a server).
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from weightbundle.serving import Event, ServingSettings, Service


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = ServingSettings.from_model_config(config)
        self._metrics = _Metrics(args["model_name"], args["model_version"])
        self.service = Service.open(args["model_repository"], args["model_version"], settings, args["model_name"],
                                    on_event=self._metrics.record)
        if self.service.bundle.version is not None:
            self._metrics.version.set(self.service.bundle.version)

    def execute(self, requests):
        parsed = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
        replies = self.service.handle(parsed)
        version = self.service.bundle.version
        if version is not None:
            self._metrics.version.set(version)
        responses = []
        for r in replies:
            if r.error is not None:
                code = getattr(pb_utils.TritonError, r.code, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(r.error, code)))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, _triton_array(v)) for k, v in r.outputs.items()]))
        return responses

    def finalize(self):
        self.service.close()


def _triton_array(a):
    # Triton wants C-contiguous arrays; slices of a batched output may not be.
    return a if a.dtype == object else np.ascontiguousarray(a)


LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class _Metrics:
    """Counters and gauges on Triton's /metrics, labelled by model and version."""

    def __init__(self, model, version):
        labels = {"model": model, "version": str(version)}
        self._labels = labels
        self._applied = pb_utils.MetricFamily("weightbundle_updates_applied_total", "Weight commands applied", pb_utils.MetricFamily.COUNTER)
        self._rejected = pb_utils.MetricFamily("weightbundle_updates_rejected_total", "Weight commands rejected, by reason", pb_utils.MetricFamily.COUNTER)
        self._latency = pb_utils.MetricFamily("weightbundle_update_duration_seconds", "Time to apply a weight command",
                                              pb_utils.MetricFamily.HISTOGRAM)
        # Families must outlive their metrics, so keep every family on self.
        self._version_family = pb_utils.MetricFamily("weightbundle_weights_version", "Current weight version", pb_utils.MetricFamily.GAUGE)
        self.version = self._version_family.Metric(labels=labels)
        self._by_key = {}

    def _metric(self, family, buckets=None, **extra):
        key = (id(family), tuple(sorted(extra.items())))
        if key not in self._by_key:
            labels = {**self._labels, **extra}
            self._by_key[key] = family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)
        return self._by_key[key]

    def record(self, event: Event):
        if event.kind == "update_applied":
            self._metric(self._applied, op=event.op).increment(1)
            self._metric(self._latency, buckets=LATENCY_BUCKETS, op=event.op).observe(event.seconds)
            if event.version is not None:
                self.version.set(event.version)
        else:
            self._metric(self._rejected, op=event.op, reason=event.reason).increment(1)
