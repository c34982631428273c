"""The core every layer may use: errors, specs, the artifact store, data, metrics, ONNX helpers."""
