"""Device role: onnxruntime inference on a sensor stream, Forward-Forward adaptation of the
prototypes and gates in numba, and prototype sync over MQTT. Imports numpy, numba, onnxruntime
and paho-mqtt; never torch, never another role.

    session  OnnxModel: the ONNX graph, fed the live prototype arrays each call
    kernels  numba kernels (EMA re-standardisation, the FF step)
    learner  FFLearner: per-sample predict-then-learn, delta/release bookkeeping
    state    durable state (atomic, checksummed) so a reboot loses nothing
    sync     DeviceSync: paho-mqtt client, outbox re-sent on every connect
"""
