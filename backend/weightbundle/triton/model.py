"""weightbundle's Triton python-based backend.

Deployed as ``<backend-directory>/weightbundle/model.py``; a model selects it with
``backend: "weightbundle"`` and keeps ``<version>/model.bundle`` in its folder.
Thin by design: parse config, convert tensors, build responses.  The work is in
``weightbundle.serving`` (unit-tested without a server).
"""

import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

from weightbundle import lifecycle
from weightbundle.memory import map_large_allocations
from weightbundle.serving import Event, Reply, ServingSettings, Service


class TritonPythonModel:
    def initialize(self, args):
        lifecycle.watch_parent()  # first: a stub whose server dies must exit (issue 8, defect 8)
        _check_stub_reads_numpy()
        map_large_allocations()  # before the bundle allocates: freed model-sized blocks go back to the OS
        config = json.loads(args["model_config"])
        settings = ServingSettings.from_model_config(config)
        if args.get("model_instance_kind") == "GPU":  # device=cuda: this instance's GPU
            settings.device_id = int(args.get("model_instance_device_id") or 0)
            if settings.device == "cpu":
                _log("weightbundle: this instance is KIND_GPU but parameter device is 'cpu': inference runs on the CPU (set device to 'cuda')", "info")
        self._metrics = _Metrics(args["model_name"], args["model_version"])
        self.service = Service.open(
            args["model_repository"], args["model_version"], settings, args["model_name"], on_event=self._metrics.record, model_config=config, log=_log
        )
        if self.service.bundle.version is not None:
            self._metrics.version.set(self.service.bundle.version)

    def execute(self, requests):
        # Reading one request's tensors can fail (a malformed string tensor): that request
        # alone gets the error, the rest of the batch is served.
        parsed, unreadable = [], {}
        for k, request in enumerate(requests):
            try:
                parsed.append({t.name(): t.as_numpy() for t in request.inputs()})
            except Exception as e:  # noqa: BLE001
                unreadable[k] = Reply(error=f"cannot read the request's tensors ({type(e).__name__})")
        served = iter(self.service.handle(parsed))
        replies = [unreadable[k] if k in unreadable else next(served) for k in range(len(requests))]
        try:
            version = self.service.bundle.version
            if version is not None:
                self._metrics.version.set(version)
        except Exception as e:  # noqa: BLE001 - a gauge must not fail the batch
            _log(f"weightbundle: cannot update the version gauge: {e!r}")
        return [_response(r) for r in replies]

    def finalize(self):
        self.service.close()


def _response(r):
    if r.error is None:
        try:
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, _triton_array(v)) for k, v in r.outputs.items()])
        except Exception as e:  # noqa: BLE001
            _log(f"weightbundle: cannot build a response: {e!r}")
            r = Reply(error=f"internal error while building the response ({type(e).__name__})", code="INTERNAL")
    code = getattr(pb_utils.TritonError, r.code, pb_utils.TritonError.INVALID_ARG)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(r.error, code))


def _log(message, level="warn"):
    logger = getattr(pb_utils, "Logger", None)  # injected by the stub; absent in unit-test fakes
    if logger is not None:
        (logger.log_info if level == "info" else logger.log_warn)(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _check_stub_reads_numpy():
    """Refuse to load where the stub misreads this numpy, instead of serving garbled inputs.

    Triton 2.51's stubs read numpy 1's dtype layout: under numpy 2 a numeric input arrives as
    copies of its first element and a string input crashes the stub. A tensor made by DLPack
    from another stub tensor gets its array the way inputs do, so reading it back shows the
    fault up front. (Not from a numpy array's DLPack: the stub renames the consumed capsule
    in a way numpy 1's capsule destructor rejects, which kills the stub.)
    """
    from_dlpack = getattr(pb_utils.Tensor, "from_dlpack", None)
    if from_dlpack is None:  # python backends without DLPack predate numpy 2
        return
    probe = np.arange(1, 5, dtype=np.float32)
    got = np.asarray(from_dlpack("weightbundle_probe", pb_utils.Tensor("weightbundle_probe", probe)).as_numpy())
    if not np.array_equal(got, probe):
        raise RuntimeError(
            f"this Triton python backend stub misreads numpy {np.__version__} arrays ({probe.tolist()} reads back as "
            f"{got.tolist()}), so every input would arrive garbled; install numpy<2 in the Python the stub runs "
            "(or point the model parameter EXECUTION_ENV_PATH at an environment that has it)"
        )


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
        self._latency = pb_utils.MetricFamily("weightbundle_update_duration_seconds", "Time to apply a weight command", pb_utils.MetricFamily.HISTOGRAM)
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
